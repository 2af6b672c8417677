package daemon

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"time"

	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/serverlog"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// Options are a server's settings: what `kiln server`'s flags (or its config file) set.
// Sizes are in bytes, parsed and bounded where their flags are read.
type Options struct {
	DataDir     string
	Listen      string
	DB          string
	HostName    string
	Advertise   string
	Network     bool
	Pool        string
	Egress      string
	EgressAllow []string
	ProxyListen string
	Domain      string
	Idle        time.Duration
	Wake        time.Duration
	// VMM names the driver machines and builders run on: qemu, firecracker, or auto
	// (Firecracker where its binary, its jailer and a working KVM exist, else QEMU).
	VMM string

	// PeerListen is where other hosts sharing PostgreSQL call this one (mutual TLS);
	// "" is the API's host on a free port. ClusterSecretFile holds the cluster's
	// secret; "" is DATA_DIR/cluster-secret.
	PeerListen        string
	ClusterSecretFile string

	BuildCacheBytes int64
	BuildMaxContext int64
	BuilderCPUs     int
	BuilderMemory   int
	BuilderIdle     time.Duration
	MaxBuilds       int
	ImagesKept      int
	GitAllowFile    bool
	GitTimeout      time.Duration

	CPUOvercommit float64
	MemOvercommit float64
	ReserveCPUs   int
	ReserveMemory int
	CapacityWait  time.Duration

	// Slow and hostile clients of the API and the proxy.
	HeaderTimeout   time.Duration
	ConnIdle        time.Duration
	MaxHeaderBytes  int64
	APIMaxUnauth    int
	ProxyMaxPending int
	TCPMaxConns     int
	TCPIdle         time.Duration

	ImageMaxBytes int64
	VMUIDs        string
	// SharedImages lists the registry namespaces every token may pull from
	// (localhost/NS/...); only the operator pushes there.
	SharedImages []string
	// AuditRetention is how long audit entries are kept; 0 keeps them all.
	AuditRetention time.Duration
	// EventRetention is how long the event journal (GET /v1/events) keeps an event; 0
	// keeps them all.
	EventRetention time.Duration
	// SecretsKey is the file holding the key that seals apps' secrets; "" keeps one in
	// the data directory (created 0600 on first start). Hosts sharing a database name
	// the same file.
	SecretsKey string
	// LogFormat is how the server's log lines are written on stderr: text or json
	// (serverlog.Formats).
	LogFormat string

	// Source says where a flag's value came from, for the limits' registry ("flag
	// --x", "config file (x)", "default (flag --x)"); nil says default for all.
	Source func(flag string) string
}

// Host is what the server takes from the kiln binary it runs in: how it finds and
// prepares its VMs' parts, which `kiln vm` and `kiln assets` share.
type Host struct {
	// Runtime prepares the VM runtime on the named driver: assets present, accelerator
	// resolved (said in words, the second result). What it has to say goes to log.
	Runtime func(ctx context.Context, vmm string, log io.Writer) (*vmrun.Runtime, string, error)
	// Reap removes what killed kiln processes left behind, saying so on log.
	Reap func(ctx context.Context, log io.Writer)
	// AssetsDir is where guest assets are cached; Buildkitd is the binary builder VMs
	// run ("" if there is none).
	AssetsDir string
	Buildkitd string
}

// check refuses settings that cannot work, before anything is made.
func (o Options) check() error {
	switch o.VMM {
	case "qemu", "firecracker", "auto", "":
	default:
		return errdefs.Invalid("--vmm %q: use qemu, firecracker or auto", o.VMM)
	}
	if _, err := serverlog.New(io.Discard, o.LogFormat); err != nil {
		return err
	}
	if o.Idle <= 0 || o.Wake <= 0 {
		return errdefs.Invalid("--idle-timeout and --wake-timeout must be positive durations, like 5m")
	}
	if o.CapacityWait < 0 {
		return errdefs.Invalid("--capacity-wait %s must not be negative", o.CapacityWait)
	}
	if _, err := o.httpLimits(); err != nil {
		return err
	}
	if err := o.checkBuilds(); err != nil {
		return err
	}
	if _, err := vmrun.ParseUIDRange(o.VMUIDs); err != nil {
		return fmt.Errorf("--vm-uids: %w", err)
	}
	if o.Network {
		if _, err := o.netConfig(); err != nil {
			return err
		}
	} else if o.ProxyListen != "off" {
		return errdefs.Invalid("the proxy reaches machines over their private network: with --network=false, also give --proxy-listen off")
	}
	return nil
}

// here is this host as it offers itself.
func (o Options) here(name string, cpus, memMiB int) (capacity.Host, error) {
	if o.HostName != "" {
		name = o.HostName
	}
	h := capacity.Host{Name: name, CPUs: cpus, MemoryMiB: memMiB,
		CPURatio: o.CPUOvercommit, MemRatio: o.MemOvercommit, ReserveCPUs: o.ReserveCPUs, ReserveMemoryMiB: o.ReserveMemory}
	if err := h.Validate(); err != nil {
		return h, fmt.Errorf("%w (flags --cpu-overcommit, --memory-overcommit, --reserve-cpus, --reserve-memory)", err)
	}
	return h, nil
}

// netConfig turns the flags into the network's configuration.
func (o Options) netConfig() (network.Config, error) {
	var cfg network.Config
	pool, err := netip.ParsePrefix(o.Pool)
	if err != nil {
		return cfg, errdefs.Invalid("--network-pool %q: want an IPv4 prefix like 10.208.0.0/16", o.Pool)
	}
	cfg.Pool = pool
	switch o.Egress {
	case "masquerade", "":
	case "none":
		cfg.EgressOff = true
	default:
		a, err := netip.ParseAddr(o.Egress)
		if err != nil || !a.Is4() {
			return cfg, errdefs.Invalid("--egress %q: want masquerade, none or an IPv4 address of this host", o.Egress)
		}
		cfg.Egress = a
	}
	for _, s := range o.EgressAllow {
		p, err := netip.ParsePrefix(s)
		if err != nil || !p.Addr().Is4() {
			return cfg, errdefs.Invalid("--egress-allow %q: want an IPv4 prefix like 10.1.2.0/24", s)
		}
		cfg.EgressAllow = append(cfg.EgressAllow, p)
	}
	return cfg, nil
}

// httpLimits are the API's and the proxy's limits on slow clients; a caller sets its own
// cap on pending connections.
func (o Options) httpLimits() (connlimit.HTTP, error) {
	if o.HeaderTimeout <= 0 || o.ConnIdle <= 0 || o.TCPIdle <= 0 {
		return connlimit.HTTP{}, errdefs.Invalid("--header-timeout, --conn-idle-timeout and --tcp-idle-timeout must be positive durations, like 10s")
	}
	if o.APIMaxUnauth < 1 || o.ProxyMaxPending < 1 || o.TCPMaxConns < 1 {
		return connlimit.HTTP{}, errdefs.Invalid("--api-max-unauthenticated-conns, --proxy-max-pending-conns and --tcp-max-conns must be at least 1")
	}
	return connlimit.HTTP{HeaderTimeout: o.HeaderTimeout, IdleTimeout: o.ConnIdle, MaxHeaderBytes: int(o.MaxHeaderBytes)}, nil
}

// checkBuilds refuses build settings that cannot work.
func (o Options) checkBuilds() error {
	if o.GitTimeout <= 0 {
		return errdefs.Invalid("--build-git-timeout %s: want a positive duration, like 5m", o.GitTimeout)
	}
	if o.MaxBuilds < 1 || o.BuilderCPUs < 1 || o.BuilderMemory < 512 || o.BuilderIdle <= 0 {
		return errdefs.Invalid("--max-builds and --builder-cpus must be at least 1, --builder-memory at least 512 (MiB), --builder-idle positive")
	}
	return nil
}

func (o Options) source(flag string) string {
	if o.Source == nil {
		return "default (flag --" + flag + ")"
	}
	return o.Source(flag)
}
