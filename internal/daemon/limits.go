package daemon

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/kilnhq/kiln/internal/appconfig"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/deploy"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/guest/agent"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/limits"
	"github.com/kilnhq/kiln/internal/machinelog"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/proxy"
	"github.com/kilnhq/kiln/internal/secrets"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// registerLimits lists every limit this server enforces, with its value and where it
// was set, in the registry `kiln limits show` prints.
func registerLimits(r *limits.Registry, o Options, h capacity.Host, b *build.Service) {
	src := o.source
	r.Set("host.cpus_offered", h.AllowedCPUs(), "vCPUs", src("cpu-overcommit"), fmt.Sprintf("(%d CPUs − %d reserved) × %.2g overcommit: the vCPUs running machines and builders may hold", h.CPUs, h.ReserveCPUs, h.CPURatio))
	r.Set("host.memory_offered", h.AllowedMemoryMiB(), "MiB", src("memory-overcommit"), fmt.Sprintf("(%d MiB − %d reserved) × %.2g overcommit: the memory running machines and builders may hold", h.MemoryMiB, h.ReserveMemoryMiB, h.MemRatio))
	r.Set("host.cpu_overcommit", h.CPURatio, "×", src("cpu-overcommit"), fmt.Sprintf("1 to %d", capacity.MaxCPURatio))
	r.Set("host.memory_overcommit", h.MemRatio, "×", src("memory-overcommit"), fmt.Sprintf("1 to %d", capacity.MaxMemRatio))
	r.Set("host.reserve_cpus", h.ReserveCPUs, "CPUs", src("reserve-cpus"), "kept for the host, never offered")
	r.Set("host.reserve_memory", h.ReserveMemoryMiB, "MiB", src("reserve-memory"), "kept for the host, never offered")
	r.Set("image.max_size", o.ImageMaxBytes, "bytes", src("image-max-size"), "uncompressed size of an image being converted: the layers read and the files written")
	r.Set("image.max_entries", image.DefaultMaxEntries, "entries", "built in", "tar entries across an image's layers")
	r.Set("image.max_path", image.DefaultMaxPathLen, "bytes", "built in", "length of a path or link target in an image")
	r.Set("capacity.queue_wait", o.CapacityWait, "", src("capacity-wait"), "how long a start waits for room before it fails naming the resource")
	r.Set("machine.cpus", fmt.Sprintf("1-%d", h.CPUs), "vCPUs", "the host's CPUs", "vCPUs of one machine")
	r.Set("machine.memory", fmt.Sprintf("%d-%d", vmm.MinMemoryMiB, h.MemoryMiB-256), "MiB", "the host's memory less 256 MiB", "memory of one machine")
	r.Set("machine.logs_kept", machinelog.LogCap, "bytes", "built in", "workload output kept per machine on the host; oldest dropped first")
	r.Set("machine.guest_output_buffer", agent.OutputCap, "bytes", "built in", "workload output the guest keeps while the host is away")
	r.Set("vm.cpu", "vCPUs × 100", "ms per 100 ms", "built in", "CPU time a VM's cgroup allows its VMM: its vCPUs, no more")
	r.Set("vm.memory_overhead", vmrun.DefaultMemoryOverheadMiB, "MiB", "built in (QEMU under TCG measured ~180 MiB)", "memory a VM's cgroup allows its VMM beyond the VM's RAM")
	r.Set("vm.users", o.VMUIDs, "uids", src("vm-uids"), "host users VMMs run as, one per VM")
	r.Set("machine.console_log", vmm.ConsoleLogCap, "bytes", "built in", "guest console kept per VM on the host, in two files; oldest dropped first")
	r.Set("exec.output", machines.ExecOutputCap, "bytes", "built in", "stdout and stderr each of a buffered exec; the rest is dropped and the answer says truncated (a streaming exec has none)")
	r.Set("ps.processes", guest.MaxProcs, "processes", "built in", "processes a machine's ps lists (the rest are left out); command and directory are cut to ps.string")
	r.Set("ps.string", guest.MaxProcString, "bytes", "built in", "command line or directory of one process in a machine's ps")
	r.Set("exec.timeout_max", machines.MaxExecTimeout, "", "built in", "longest timeout an exec may ask for, and the timeout of one that asks for none (an interactive session included); a longer one is refused")
	r.Set("network.apps", 1<<(24-mustPrefix(o.Pool).Bits()), "apps", src("network-pool"), "apps with a private /24 in the pool")
	r.Set("network.machines_per_app", 253, "machines", "built in (a /24)", "machines on one app's network")
	allowed := "none"
	if len(o.EgressAllow) > 0 {
		allowed = strings.Join(o.EgressAllow, ", ")
	}
	r.Set("network.egress_allow", allowed, "", src("egress-allow"), "ranges machines and builders may reach beyond the internet")
	r.Set("network.egress_blocked", network.BlockedByDefault, "", "built in", "ranges machines and builders may not reach unless allowed; this host, the database and peer hosts are never reachable")
	r.Set("proxy.soft_limit", proxy.DefaultSoftLimit, "requests", "default (service concurrency.soft_limit)", "per machine before the proxy prefers another or starts one")
	r.Set("proxy.hard_limit", proxy.DefaultHardLimit, "requests", "default (service concurrency.hard_limit)", "per machine; past it requests wait")
	r.Set("proxy.wake_timeout", o.Wake, "", src("wake-timeout"), "how long a request waits for a machine to start or resume")
	r.Set("proxy.idle_timeout", o.Idle, "", src("idle-timeout"), "idle time before autostop stops or suspends a machine")
	r.Set("http.header_timeout", o.HeaderTimeout, "", src("header-timeout"), "time an API or proxy HTTP client has to send a request's headers; then its connection is closed")
	r.Set("http.idle_timeout", o.ConnIdle, "", src("conn-idle-timeout"), "time a kept-alive API or proxy HTTP connection may wait for its next request")
	r.Set("http.max_header_bytes", o.MaxHeaderBytes, "bytes", src("max-header-size"), "request headers the API and the proxy read; larger ones get 431")
	r.Set("api.unauthenticated_conns", o.APIMaxUnauth, "connections", src("api-max-unauthenticated-conns"), "API connections not yet authenticated and not in a request; past it the oldest is closed")
	r.Set("proxy.pending_conns", o.ProxyMaxPending, "connections", src("proxy-max-pending-conns"), "per proxy HTTP port, connections not in a request; past it the oldest is closed")
	r.Set("proxy.tcp_conns", o.TCPMaxConns, "connections", src("tcp-max-conns"), "open connections per raw TCP port; past it new ones are closed at once")
	r.Set("proxy.tcp_idle_timeout", o.TCPIdle, "", src("tcp-idle-timeout"), "a raw TCP connection passing no byte either way for this long is closed, both sides")
	r.Set("process.open_files", connlimit.OpenFileLimit(), "files", "RLIMIT_NOFILE (Go raises the soft limit to the hard one, less 1, at start)", "descriptors the server may hold; the connection caps keep floods under it")
	r.Set("image.upload", int64(8<<30), "bytes", "built in", "largest image tarball accepted by POST /v1/images")
	r.Set("events.retention", o.EventRetention, "", src("event-retention"), "how long the event journal (GET /v1/events, kiln events) keeps an event; 0 keeps them all")
	r.Set("events.followers", server.MaxEventFollowers, "streams", "built in", "follows of GET /v1/events open at once on this server")
	r.Set("events.followers_per_token", server.MaxEventFollowersPerToken, "streams", "built in", "follows of GET /v1/events one token may hold open at once")
	r.Set("events.page", store.MaxEventPage, "events", "built in", "events one call of GET /v1/events may ask for (limit)")
	r.Set("events.message", store.MaxEventMessage, "bytes", "built in", "an event's message (an exit's or a build failure's text is cut to it)")
	r.Set("deploy.config", server.MaxConfigBytes, "bytes", "built in", "a deploy's fly.toml or kiln.toml (each release keeps it)")
	r.Set("deploy.process_groups", appconfig.MaxGroups, "groups", "built in", "process groups of one app's config")
	r.Set("deploy.count", appconfig.MaxCount, "machines", "built in", "machines of one process group (kiln scale count, [kiln] counts)")
	r.Set("deploy.timeout_max", appconfig.MaxTimeout, "", "built in", "longest wait_timeout or release_command_timeout a config may give")
	r.Set("deploy.drain", deploy.DefaultDrain, "", "built in", "how long a deploy waits for a machine it took out of service to finish its requests")
	r.Set("secrets.per_app", secrets.MaxSecrets, "secrets", "built in", "secrets of one app")
	r.Set("secrets.value", secrets.MaxValueBytes, "bytes", "built in", "one secret's value")
	r.Set("secrets.sealed", secrets.MaxSealed, "bytes", "built in", "an app's secrets, sealed, in all")
	if b == nil {
		return
	}
	r.Set("build.context", b.MaxContextBytes, "bytes", src("build-max-context"), "largest build context")
	r.Set("build.log", b.MaxLogBytes, "bytes", "built in", "build log kept; the rest is dropped and the build marked log_truncated")
	r.Set("build.attempts", b.MaxAttempts, "runs", "built in", "runs of a build whose infrastructure fails")
	r.Set("build.concurrent", b.MaxConcurrent, "builds", src("max-builds"), "builds running at once, one per project")
	r.Set("build.cache_volume", b.Builders.CacheBytes, "bytes", src("build-cache-size"), "each project's cache volume")
	r.Set("build.cache_gc_keep", b.Builders.KeepBytes, "bytes", "60 % of build.cache_volume", "BuildKit's garbage collection target")
	r.Set("build.cache_reset_above", fmt.Sprintf("%.0f%%", build.ResetAbove*100), "", "built in", "a cache fuller than this after a build is reset")
	r.Set("build.builder_cpus", b.Builders.CPUs, "vCPUs", src("builder-cpus"), "vCPUs of a builder VM")
	r.Set("build.builder_memory", b.Builders.MemoryMiB, "MiB", src("builder-memory"), "memory of a builder VM")
	r.Set("build.builder_idle", b.Builders.Idle, "", src("builder-idle"), "idle time before a builder is suspended")
	r.Set("build.secret", 500<<10, "bytes", "built in", "one build secret")
	r.Set("build.images_kept", b.KeepImages, "images", src("build-images-kept"), "newest build images kept per project; older ones are deleted from the registry")
	r.Set("build.git_timeout", b.Git.Timeout, "", src("build-git-timeout"), "time one git fetch of a build context may take")
	r.Set("build.git_allow_file", b.Git.AllowFile, "", src("build-git-allow-file"), "whether git builds may take file:// URLs (repositories on the host)")
}

func mustPrefix(s string) netip.Prefix {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return network.DefaultPool
	}
	return p
}
