package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	stdruntime "runtime"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/assets"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/node"
	"github.com/kilnhq/kiln/internal/proxy"
	"github.com/kilnhq/kiln/internal/registry"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// DefaultListen is where `kiln server` listens unless told otherwise.
const DefaultListen = "127.0.0.1:4280"

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// adminToken reads DATA_DIR/admin-token, creating it on first start.
func adminToken(dataDir string) (string, bool, error) {
	p := filepath.Join(dataDir, "admin-token")
	if b, err := os.ReadFile(p); err == nil && len(strings.TrimSpace(string(b))) > 0 {
		return strings.TrimSpace(string(b)), false, nil
	}
	var b [32]byte
	rand.Read(b[:])
	tok := hex.EncodeToString(b[:])
	if err := os.WriteFile(p, []byte(tok+"\n"), 0o600); err != nil {
		return "", false, err
	}
	return tok, true, nil
}

// rootfsCache is where converted images live; the server and `kiln vm run --image`
// share it.
func rootfsCache(dataDir string) image.Cache {
	return image.Cache{Dir: filepath.Join(dataDir, "images", "rootfs")}
}

// serverOptions are `kiln server`'s settings beyond the data dir.
type serverOptions struct {
	listen      string
	network     bool
	pool        string
	egress      string
	proxyListen string
	domain      string
	idle        time.Duration
	wake        time.Duration

	buildCache      string
	buildMaxContext string
	builderCPUs     int
	builderMemory   int
	builderIdle     time.Duration
	maxBuilds       int
}

func serverCmd(g *globals) *cobra.Command {
	var o serverOptions
	c := &cobra.Command{
		Use:   "server",
		Short: "Run kiln's API and machines on this host (SQLite, local images)",
		Long: `Run the kiln server: the REST API (Fly Machines shapes) under /v1, the machines of
this host, and their stored logs. State lives in the data dir (--data-dir, KILN_DATA_DIR);
the admin token is written to DATA_DIR/admin-token on first start. Machines keep running
when the server stops or dies; the next start adopts them.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runServer(cmd.Context(), g.dataDir, o) },
	}
	f := c.Flags()
	f.StringVar(&o.listen, "listen", envOr("KILN_LISTEN", DefaultListen), "address to serve the API on (env KILN_LISTEN)")
	f.BoolVar(&o.network, "network", true, "give machines a private network per app (bridges, TAP devices, nftables; needs root)")
	f.StringVar(&o.pool, "network-pool", network.DefaultPool.String(), "IPv4 prefix that apps' /24 networks come from")
	f.StringVar(&o.egress, "egress", "masquerade", "machines' outbound traffic: masquerade (the host's address), an IP address to translate to, or none")
	f.StringVar(&o.proxyListen, "proxy-listen", envOr("KILN_PROXY_LISTEN", DefaultProxyListen), "the proxy's HTTP listener, standing for public port 80; other public ports listen on its host; off disables the proxy (env KILN_PROXY_LISTEN)")
	f.StringVar(&o.domain, "proxy-domain", "kiln.internal", "HTTP requests for Host <app>.DOMAIN go to the app's machines")
	f.DurationVar(&o.idle, "idle-timeout", 5*time.Minute, "how long a machine whose service has autostop on may go without traffic")
	f.DurationVar(&o.wake, "wake-timeout", time.Minute, "how long the proxy holds a request while it starts or resumes a machine")
	f.StringVar(&o.buildCache, "build-cache-size", "20G", "size of each project's BuildKit cache volume (sparse); BuildKit's GC keeps it under 60 %")
	f.StringVar(&o.buildMaxContext, "build-max-context", "512M", "largest build context accepted")
	f.IntVar(&o.builderCPUs, "builder-cpus", stdruntime.NumCPU(), "vCPUs of a builder VM")
	f.IntVar(&o.builderMemory, "builder-memory", 2048, "memory of a builder VM in MiB")
	f.DurationVar(&o.builderIdle, "builder-idle", 10*time.Minute, "how long a project's builder stays up after its last build")
	f.IntVar(&o.maxBuilds, "max-builds", 2, "builds running at once (each on its own project's builder)")
	return c
}

// DefaultProxyListen is where the proxy's HTTP listener binds unless told otherwise.
const DefaultProxyListen = "127.0.0.1:8080"

// netConfig turns the flags into the network's configuration.
func (o serverOptions) netConfig() (network.Config, error) {
	var cfg network.Config
	pool, err := netip.ParsePrefix(o.pool)
	if err != nil {
		return cfg, errdefs.Invalid("--network-pool %q: want an IPv4 prefix like 10.208.0.0/16", o.pool)
	}
	cfg.Pool = pool
	switch o.egress {
	case "masquerade", "":
	case "none":
		cfg.EgressOff = true
	default:
		a, err := netip.ParseAddr(o.egress)
		if err != nil || !a.Is4() {
			return cfg, errdefs.Invalid("--egress %q: want masquerade, none or an IPv4 address of this host", o.egress)
		}
		cfg.Egress = a
	}
	return cfg, nil
}

func runServer(ctx context.Context, dataDir string, o serverOptions) error {
	listen := o.listen
	if o.idle <= 0 || o.wake <= 0 {
		return errdefs.Invalid("--idle-timeout and --wake-timeout must be positive durations, like 5m")
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return err
	}
	reap(ctx, dataDir)
	tok, created, err := adminToken(dataDir)
	if err != nil {
		return err
	}
	if created {
		fmt.Fprintf(os.Stderr, "kiln: created the admin token: %s\n", filepath.Join(dataDir, "admin-token"))
	} else {
		fmt.Fprintf(os.Stderr, "kiln: admin token: %s\n", filepath.Join(dataDir, "admin-token"))
	}
	db, err := sqlstore.Open(ctx, filepath.Join(dataDir, "kiln.db"))
	if err != nil {
		return err
	}
	defer db.Close()
	rt, accel, err := runtime(ctx, dataDir, "qemu", "", "", os.Stderr)
	if err != nil {
		return err
	}
	// Listen first: the built-in registry's address is where machines pull localhost/ images.
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w (another kiln server? choose one with --listen)", listen, err)
	}
	images := image.Registries{Local: ln.Addr().String(), Token: tok}
	reg := registry.Handler(ctx, filepath.Join(dataDir, "registry"), tok)
	mgr := node.New(db, rt, images, rootfsCache(dataDir), filepath.Join(dataDir, "machines"), os.Stderr)
	var nets *network.Manager
	if o.network {
		cfg, err := o.netConfig()
		if err != nil {
			ln.Close()
			return err
		}
		if nets, err = network.Open(filepath.Join(dataDir, "network"), cfg, os.Stderr); err != nil {
			ln.Close()
			return err
		}
		defer nets.Close()
		mgr.Net = nets
	}
	var px *proxy.Proxy
	if o.proxyListen != "off" {
		if !o.network {
			ln.Close()
			return errdefs.Invalid("the proxy reaches machines over their private network: with --network=false, also give --proxy-listen off")
		}
		px = proxy.New(proxyMachines{db: db, mgr: mgr, nets: nets, wake: o.wake}, proxy.Config{
			HTTPAddr: o.proxyListen, Domain: o.domain, IdleTimeout: o.idle, WakeTimeout: o.wake, Log: os.Stderr})
		if err := px.Listen(); err != nil {
			ln.Close()
			return err
		}
	}
	builds, err := o.buildService(ctx, dataDir, db, rt, images)
	if err != nil {
		ln.Close()
		return err
	}
	apiSrv := &server.Server{Store: db, Node: mgr, Images: images, Registry: reg, Token: tok, Builds: builds}
	apiSrv.Recovering.Store(true)
	srv := &http.Server{Handler: apiSrv.Handler()}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	// Recovery may need images from the registry, so it runs once the server serves;
	// the API answers 503 until it is done.
	if err := mgr.Recover(ctx); err != nil {
		srv.Close()
		mgr.Close()
		return fmt.Errorf("recovering machines: %w", err)
	}
	apiSrv.Recovering.Store(false)
	if builds != nil {
		bctx, stopBuilds := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { builds.Run(bctx); close(done) }()
		defer func() {
			stopBuilds()
			<-done
			builds.Builders.Close(context.WithoutCancel(ctx))
		}()
	}
	if px != nil {
		pctx, stopProxy := context.WithCancel(ctx)
		defer stopProxy()
		go px.Run(pctx)
		fmt.Fprintf(os.Stderr, "kiln: proxy serves http://<app>.%s on %s\n", o.domain, px.Addr())
	}
	fmt.Fprintf(os.Stderr, "kiln: serving the API and the image registry on http://%s (accelerator %s)\n", ln.Addr(), accel)
	select {
	case <-ctx.Done():
	case err := <-errc:
		mgr.Close()
		return err
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	mgr.Close()
	fmt.Fprintln(os.Stderr, "kiln: stopped; machines keep running and are adopted at the next start")
	return nil
}

// proxyMachines lets the proxy see machines with services and start or stop them through
// the node, like any API call.
type proxyMachines struct {
	db interface {
		ListApps(ctx context.Context) ([]string, error)
		ListMachines(ctx context.Context, app string) ([]store.Machine, error)
	}
	mgr  *node.Manager
	nets *network.Manager
	wake time.Duration
}

func (p proxyMachines) Targets(ctx context.Context) ([]proxy.Target, error) {
	apps, err := p.db.ListApps(ctx)
	if err != nil {
		return nil, err
	}
	var out []proxy.Target
	for _, app := range apps {
		ms, err := p.db.ListMachines(ctx, app)
		if err != nil {
			return nil, err
		}
		for _, m := range ms {
			var cfg api.MachineConfig
			if json.Unmarshal(m.Config, &cfg); len(cfg.Services) == 0 || m.State == machine.Destroyed {
				continue
			}
			l, ok := p.nets.Lookup(m.ID)
			if !ok {
				continue // never booted yet: it gets its address on its first start
			}
			out = append(out, proxy.Target{ID: m.ID, App: app, State: m.State, Addr: l.Addr.Addr(), Services: cfg.Services})
		}
	}
	return out, nil
}

func (p proxyMachines) Start(ctx context.Context, id string) error {
	if err := p.mgr.Start(ctx, id); err != nil && !errors.Is(err, errdefs.ErrConflict) {
		return err
	}
	return p.mgr.Wait(ctx, id, machine.Started, p.wake)
}

func (p proxyMachines) Stop(ctx context.Context, id string) error    { return p.mgr.Stop(ctx, id) }
func (p proxyMachines) Suspend(ctx context.Context, id string) error { return p.mgr.Suspend(ctx, id) }

// buildService sets up builds, or returns nil (builds off, said in the log) where the
// builder root filesystem is missing.
func (o serverOptions) buildService(ctx context.Context, dataDir string, db *sqlstore.DB, rt *vmrun.Runtime, images image.Registries) (*build.Service, error) {
	cacheBytes, err := parseSize(o.buildCache)
	if err != nil || cacheBytes < 1<<30 {
		return nil, errdefs.Invalid("--build-cache-size %q: want a size of at least 1G, like 20G", o.buildCache)
	}
	maxContext, err := parseSize(o.buildMaxContext)
	if err != nil || maxContext <= 0 {
		return nil, errdefs.Invalid("--build-max-context %q: want a size like 512M", o.buildMaxContext)
	}
	if o.maxBuilds < 1 || o.builderCPUs < 1 || o.builderMemory < 512 || o.builderIdle <= 0 {
		return nil, errdefs.Invalid("--max-builds and --builder-cpus must be at least 1, --builder-memory at least 512 (MiB), --builder-idle positive")
	}
	rootfs, err := assets.EnsureBuilder(ctx, assets.Options{Dir: assetsDir(dataDir)}, buildkitdBinary())
	if err != nil {
		fmt.Fprintf(os.Stderr, "kiln: builds are off: %v\n", err)
		return nil, nil
	}
	return &build.Service{
		Store: db,
		Builders: &build.Builders{RT: rt, Rootfs: rootfs, Dir: filepath.Join(dataDir, "builders"),
			CacheBytes: cacheBytes, KeepBytes: cacheBytes * 6 / 10, CPUs: o.builderCPUs, MemoryMiB: o.builderMemory,
			Idle: o.builderIdle, Log: os.Stderr},
		Bases:           &build.Bases{Dir: filepath.Join(dataDir, "build-bases")},
		Images:          images,
		Dir:             filepath.Join(dataDir, "builds"),
		MaxContextBytes: maxContext,
		MaxLogBytes:     16 << 20,
		MaxAttempts:     3,
		Backoff:         2 * time.Second,
		MaxConcurrent:   o.maxBuilds,
		Log:             os.Stderr,
	}, nil
}
