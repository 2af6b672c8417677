package main

import (
	"context"
	"fmt"
	"io"
	"os"
	stdruntime "runtime"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/kilnhq/kiln/internal/auditlog"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/daemon"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/proxy"
	"github.com/kilnhq/kiln/internal/serverlog"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// DefaultListen is where `kiln server` listens unless told otherwise.
const DefaultListen = "127.0.0.1:4280"

// DefaultProxyListen is where the proxy's HTTP listener binds unless told otherwise.
const DefaultProxyListen = "127.0.0.1:8080"

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// rootfsCache is where converted images live; the server and `kiln vm run --image`
// share it.
func rootfsCache(dataDir string, maxBytes int64) image.Cache {
	return daemon.RootfsCache(dataDir, maxBytes)
}

func serverCmd(g *globals) *cobra.Command {
	var o daemon.Options
	var sizes sizeFlags
	var serverConfig, kernel string
	c := &cobra.Command{
		Use:   "server",
		Short: "Run kiln's API and machines on this host (SQLite, local images)",
		Long: `Run the kiln server: the REST API (Fly Machines shapes) under /v1, the machines of
this host, and their stored logs. State lives in the data dir (--data-dir, KILN_DATA_DIR);
the admin token is written to DATA_DIR/admin-token on first start. Machines keep running
when the server stops or dies; the next start adopts them.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fromFile, err := applyServerConfig(cmd.Flags(), serverConfig)
			if err != nil {
				return err
			}
			if err := sizes.parse(&o); err != nil {
				return err
			}
			o.DataDir = g.dataDir
			o.Source = func(flag string) string {
				switch {
				case fromFile[flag]:
					return "config file (" + flag + ")"
				case cmd.Flags().Changed(flag):
					return "flag --" + flag
				}
				return "default (flag --" + flag + ")"
			}
			err = daemon.Run(cmd.Context(), o, daemon.Host{
				Runtime: func(ctx context.Context, vmm string, log io.Writer) (*vmrun.Runtime, string, error) {
					return runtime(ctx, g.dataDir, vmm, kernel, "", log)
				},
				Reap:      func(ctx context.Context, log io.Writer) { vmrun.Reap(ctx, g.dataDir, drivers(g.dataDir), log) },
				AssetsDir: assetsDir(g.dataDir),
				Buildkitd: buildkitdBinary(),
			})
			if l, lerr := serverlog.New(os.Stderr, o.LogFormat); err != nil && lerr == nil && o.LogFormat == "json" {
				// Its last line is a record too, for whatever reads the others.
				l.Error(err.Error())
				return exitError{exitCode(err)}
			}
			return err
		},
	}
	f := c.Flags()
	f.StringVar(&serverConfig, "config", os.Getenv("KILN_SERVER_CONFIG"), "a TOML file setting any of these flags by name (flags on the command line win; env KILN_SERVER_CONFIG)")
	f.StringVar(&o.LogFormat, "log-format", "text", "how the server writes its log lines on stderr: text (key=value) or json (one object a line); an API call's lines carry its request_id")
	f.StringVar(&o.VMM, "vmm", "qemu", "virtual machine monitor machines and builders run on: qemu (KVM, else software emulation), firecracker (under its jailer; needs KVM), or auto: firecracker where it, its jailer and a working KVM exist, else qemu")
	f.StringVar(&kernel, "kernel", "", "guest kernel: kiln (kiln's own, built by `make setup`), debian (the host's, with its modules; QEMU only) or the path of a vmlinux (default kiln, falling back to debian when it is not built)")
	f.StringVar(&o.Listen, "listen", envOr("KILN_LISTEN", DefaultListen), "address to serve the API on (env KILN_LISTEN)")
	f.StringVar(&o.DB, "db", os.Getenv("KILN_DB"), "database: a PostgreSQL URL (postgres://user@host/db) or a SQLite file (default DATA_DIR/kiln.db; env KILN_DB). Hosts sharing one PostgreSQL form a cluster: see --cluster-secret-file. PostgreSQL URL parameters such as sslmode=verify-full&sslrootcert=FILE are passed through")
	f.StringVar(&o.HostName, "host-name", "", "this host's name among the hosts sharing a database (default: the system's host name)")
	f.StringVar(&o.Advertise, "advertise", "", "the URL other hosts reach this host's API at (default http://LISTEN)")
	f.StringVar(&o.PeerListen, "peer-listen", os.Getenv("KILN_PEER_LISTEN"), "with PostgreSQL: where the cluster's other hosts call this one over mutual TLS (forwarded calls, image pulls), reached at --advertise's host; default the --listen host on a free port, registered in the database (give one to open in a firewall, like :4281; env KILN_PEER_LISTEN)")
	f.StringVar(&o.ClusterSecretFile, "cluster-secret-file", os.Getenv("KILN_CLUSTER_SECRET_FILE"), "with PostgreSQL: the file holding the cluster's secret, a copy of DATA_DIR/cluster-secret from the host that made the cluster (default DATA_DIR/cluster-secret; env KILN_CLUSTER_SECRET_FILE)")
	f.BoolVar(&o.Network, "network", true, "give machines a private network per app (bridges, TAP devices, nftables; needs root)")
	f.StringVar(&o.Pool, "network-pool", network.DefaultPool.String(), "IPv4 prefix that apps' /24 networks come from")
	f.StringVar(&o.Egress, "egress", "masquerade", "machines' outbound traffic: masquerade (the host's address), an IP address to translate to, or none")
	f.StringArrayVar(&o.EgressAllow, "egress-allow", nil, "an IPv4 range machines and builders may reach although it is not the internet (private, link-local…), like 10.1.2.0/24; repeatable. This host, the database and peer hosts stay closed")
	f.StringVar(&o.ProxyListen, "proxy-listen", envOr("KILN_PROXY_LISTEN", DefaultProxyListen), "the proxy's HTTP listener, standing for public port 80; other public ports listen on its host; off disables the proxy (env KILN_PROXY_LISTEN)")
	f.StringVar(&o.Domain, "proxy-domain", "kiln.internal", "HTTP requests for Host <app>.DOMAIN go to the app's machines")
	f.DurationVar(&o.Idle, "idle-timeout", 5*time.Minute, "how long a machine whose service has autostop on may go without traffic")
	f.DurationVar(&o.Wake, "wake-timeout", time.Minute, "how long the proxy holds a request while it starts or resumes a machine")
	f.StringVar(&sizes.buildCache, "build-cache-size", "20G", "size of each project's BuildKit cache volume (sparse); BuildKit's GC keeps it under 60 %")
	f.StringVar(&sizes.buildMaxContext, "build-max-context", "512M", "largest build context accepted")
	f.IntVar(&o.BuilderCPUs, "builder-cpus", stdruntime.NumCPU(), "vCPUs of a builder VM")
	f.IntVar(&o.BuilderMemory, "builder-memory", 2048, "memory of a builder VM in MiB")
	f.DurationVar(&o.BuilderIdle, "builder-idle", 10*time.Minute, "how long a project's builder stays up after its last build")
	f.IntVar(&o.MaxBuilds, "max-builds", 2, "builds running at once (each on its own project's builder)")
	f.IntVar(&o.ImagesKept, "build-images-kept", 10, "newest build images kept per project in the registry; older ones are pruned (0 keeps all)")
	f.BoolVar(&o.GitAllowFile, "build-git-allow-file", false, "let kiln build --git take file:// URLs, repositories on this host readable by the user nobody")
	f.DurationVar(&o.GitTimeout, "build-git-timeout", build.DefaultGitTimeout, "how long fetching one build context from git may take")
	f.Float64Var(&o.CPUOvercommit, "cpu-overcommit", 4, "vCPUs offered per host CPU (after the reserve); 1 means none")
	f.Float64Var(&o.MemOvercommit, "memory-overcommit", 1, "guest memory offered per MiB of host memory (after the reserve); 1 means none")
	f.IntVar(&o.ReserveCPUs, "reserve-cpus", 0, "host CPUs kept for the host itself")
	f.IntVar(&o.ReserveMemory, "reserve-memory", 1024, "host memory kept for the host itself, MiB")
	f.StringVar(&sizes.imageMax, "image-max-size", "10G", "largest image accepted, uncompressed: converting a larger one (or a gzip bomb) stops at this size")
	f.StringSliceVar(&o.SharedImages, "registry-shared", []string{"library"}, "registry namespaces every token may pull from (localhost/NS/...); only the operator's token pushes there. Images named with no namespace (localhost/NAME:TAG) are shared too")
	f.DurationVar(&o.AuditRetention, "audit-retention", auditlog.DefaultRetention, "how long the audit log keeps an entry; 0 keeps every entry")
	f.StringVar(&o.SecretsKey, "secrets-key", "", "file with the 32-byte key that seals apps' secrets (mode 0600); default DATA_DIR/secrets.key, made on first start. Hosts sharing a database need the same file")
	f.DurationVar(&o.EventRetention, "event-retention", store.DefaultEventRetention, "how long the event journal (kiln events) keeps an event; 0 keeps every event")
	f.StringVar(&o.VMUIDs, "vm-uids", vmrun.DefaultUIDs.String(), "host user IDs VMMs run as, FIRST-LAST, one per VM; no account may use them (data dirs on one host may share them: each uid is claimed host-wide)")
	f.DurationVar(&o.CapacityWait, "capacity-wait", time.Minute, "how long a machine or builder start waits in the capacity queue; 0 fails at once")
	f.DurationVar(&o.HeaderTimeout, "header-timeout", connlimit.DefaultHTTP.HeaderTimeout, "how long a client of the API or of the proxy's HTTP ports has to send a request's headers")
	f.DurationVar(&o.ConnIdle, "conn-idle-timeout", connlimit.DefaultHTTP.IdleTimeout, "how long a kept-alive API or proxy HTTP connection may wait for its next request")
	f.StringVar(&sizes.maxHeader, "max-header-size", "64K", "largest request headers the API and the proxy read (past it: 431)")
	f.IntVar(&o.APIMaxUnauth, "api-max-unauthenticated-conns", connlimit.DefaultHTTP.MaxPending, "API connections not yet authenticated and not in a request; past it the oldest is closed")
	f.IntVar(&o.ProxyMaxPending, "proxy-max-pending-conns", connlimit.DefaultHTTP.MaxPending, "connections per proxy HTTP port not in a request; past it the oldest is closed")
	f.IntVar(&o.TCPMaxConns, "tcp-max-conns", proxy.DefaultTCPMaxConns, "open connections per raw TCP port; past it new ones are closed at once")
	f.DurationVar(&o.TCPIdle, "tcp-idle-timeout", proxy.DefaultTCPIdleTimeout, "a raw TCP connection that passes no byte either way for this long is closed")
	return c
}

// sizeFlags are `kiln server`'s size flags as given (like 20G), read into Options with
// the bounds each one has.
type sizeFlags struct {
	buildCache, buildMaxContext, imageMax, maxHeader string
}

func (f sizeFlags) parse(o *daemon.Options) error {
	for _, s := range []struct {
		flag, val, want string
		min, max        int64
		to              *int64
	}{
		{"image-max-size", f.imageMax, "a size of at least 16M, like 10G", 16 << 20, 0, &o.ImageMaxBytes},
		{"build-cache-size", f.buildCache, "a size of at least 1G, like 20G", 1 << 30, 0, &o.BuildCacheBytes},
		{"build-max-context", f.buildMaxContext, "a size like 512M", 1, 0, &o.BuildMaxContext},
		{"max-header-size", f.maxHeader, "a size from 4K to 1G, like 64K", 4 << 10, 1 << 30, &o.MaxHeaderBytes},
	} {
		n, err := parseSize(s.val)
		if err != nil || n < s.min || (s.max > 0 && n > s.max) {
			return errdefs.Invalid("--%s %q: want %s", s.flag, s.val, s.want)
		}
		*s.to = n
	}
	return nil
}

// applyServerConfig sets the flags a TOML config file names (keys are flag names, like
// capacity-wait = "2m") unless the command line set them. An unknown key is an error
// that names it. It returns the flags the file set.
func applyServerConfig(fs *pflag.FlagSet, path string) (map[string]bool, error) {
	if path == "" {
		return nil, nil
	}
	var raw map[string]any
	md, err := toml.DecodeFile(path, &raw)
	if err != nil {
		return nil, errdefs.Invalid("server config %s: %v", path, err)
	}
	set := map[string]bool{}
	for _, key := range md.Keys() {
		name := key.String()
		fl := fs.Lookup(name)
		if fl == nil || name == "config" {
			return nil, errdefs.Invalid("server config %s: unknown setting %q: use the name of a `kiln server` flag, like capacity-wait", path, name)
		}
		if fs.Changed(name) {
			continue // the command line wins
		}
		values := []any{raw[name]}
		if list, ok := raw[name].([]any); ok { // a repeatable flag, like egress-allow
			values = list
		}
		for _, v := range values {
			if err := fs.Set(name, fmt.Sprint(v)); err != nil {
				return nil, errdefs.Invalid("server config %s: %s: %v", path, name, err)
			}
		}
		set[name] = true
	}
	return set, nil
}
