package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	stdruntime "runtime"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/assets"
	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest/agent"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/limits"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machinelog"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/node"
	"github.com/kilnhq/kiln/internal/proxy"
	"github.com/kilnhq/kiln/internal/registry"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/vmm"
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
	if err := atomicfile.WriteFile(p, []byte(tok+"\n"), 0o600); err != nil {
		return "", false, err
	}
	return tok, true, nil
}

// privateDataDir makes DATA_DIR its owner's alone, and tightens one that an older kiln
// or another command made open: it holds the admin token, the database, machines' logs
// and volumes. VMMs running as other users are handed open descriptors, not paths.
func privateDataDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return os.Chmod(dir, 0o700)
}

// rootfsCache is where converted images live; the server and `kiln vm run --image`
// share it.
func rootfsCache(dataDir string, maxBytes int64) image.Cache {
	return image.Cache{Dir: filepath.Join(dataDir, "images", "rootfs"), Limits: image.Limits{MaxBytes: maxBytes}}
}

// serverOptions are `kiln server`'s settings beyond the data dir.
type serverOptions struct {
	listen      string
	db          string
	hostName    string
	advertise   string
	network     bool
	pool        string
	egress      string
	egressAllow []string
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
	imagesKept      int
	gitAllowFile    bool
	gitTimeout      time.Duration

	cpuOvercommit float64
	memOvercommit float64
	reserveCPUs   int
	reserveMemory int
	capacityWait  time.Duration

	// Slow and hostile clients of the API and the proxy.
	headerTimeout   time.Duration
	connIdle        time.Duration
	maxHeaderSize   string
	apiMaxUnauth    int
	proxyMaxPending int
	tcpMaxConns     int
	tcpIdle         time.Duration

	imageMaxSize string
	vmUIDs       string

	// changed says whether the user set a flag, for the limits' sources; fromFile
	// lists those the config file set.
	changed  func(name string) bool
	fromFile map[string]bool
}

func serverCmd(g *globals) *cobra.Command {
	var o serverOptions
	var serverConfig string
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
			o.changed = cmd.Flags().Changed
			o.fromFile = fromFile
			return runServer(cmd.Context(), g.dataDir, o)
		},
	}
	f := c.Flags()
	f.StringVar(&serverConfig, "config", os.Getenv("KILN_SERVER_CONFIG"), "a TOML file setting any of these flags by name (flags on the command line win; env KILN_SERVER_CONFIG)")
	f.StringVar(&o.listen, "listen", envOr("KILN_LISTEN", DefaultListen), "address to serve the API on (env KILN_LISTEN)")
	f.StringVar(&o.db, "db", os.Getenv("KILN_DB"), "database: a PostgreSQL URL (postgres://user@host/db) or a SQLite file (default DATA_DIR/kiln.db; env KILN_DB). One host per database for now")
	f.StringVar(&o.hostName, "host-name", "", "this host's name among the hosts sharing a database (default: the system's host name)")
	f.StringVar(&o.advertise, "advertise", "", "the URL other hosts reach this host's API at (default http://LISTEN)")
	f.BoolVar(&o.network, "network", true, "give machines a private network per app (bridges, TAP devices, nftables; needs root)")
	f.StringVar(&o.pool, "network-pool", network.DefaultPool.String(), "IPv4 prefix that apps' /24 networks come from")
	f.StringVar(&o.egress, "egress", "masquerade", "machines' outbound traffic: masquerade (the host's address), an IP address to translate to, or none")
	f.StringArrayVar(&o.egressAllow, "egress-allow", nil, "an IPv4 range machines and builders may reach although it is not the internet (private, link-local…), like 10.1.2.0/24; repeatable. This host, the database and peer hosts stay closed")
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
	f.IntVar(&o.imagesKept, "build-images-kept", 10, "newest build images kept per project in the registry; older ones are pruned (0 keeps all)")
	f.BoolVar(&o.gitAllowFile, "build-git-allow-file", false, "let kiln build --git take file:// URLs, repositories on this host readable by the user nobody")
	f.DurationVar(&o.gitTimeout, "build-git-timeout", build.DefaultGitTimeout, "how long fetching one build context from git may take")
	f.Float64Var(&o.cpuOvercommit, "cpu-overcommit", 4, "vCPUs offered per host CPU (after the reserve); 1 means none")
	f.Float64Var(&o.memOvercommit, "memory-overcommit", 1, "guest memory offered per MiB of host memory (after the reserve); 1 means none")
	f.IntVar(&o.reserveCPUs, "reserve-cpus", 0, "host CPUs kept for the host itself")
	f.IntVar(&o.reserveMemory, "reserve-memory", 1024, "host memory kept for the host itself, MiB")
	f.StringVar(&o.imageMaxSize, "image-max-size", "10G", "largest image accepted, uncompressed: converting a larger one (or a gzip bomb) stops at this size")
	f.StringVar(&o.vmUIDs, "vm-uids", vmrun.DefaultUIDs.String(), "host user IDs VMMs run as, FIRST-LAST, one per VM; no account may use them (data dirs on one host may share them: each uid is claimed host-wide)")
	f.DurationVar(&o.capacityWait, "capacity-wait", time.Minute, "how long a machine or builder start waits in the capacity queue; 0 fails at once")
	f.DurationVar(&o.headerTimeout, "header-timeout", connlimit.DefaultHTTP.HeaderTimeout, "how long a client of the API or of the proxy's HTTP ports has to send a request's headers")
	f.DurationVar(&o.connIdle, "conn-idle-timeout", connlimit.DefaultHTTP.IdleTimeout, "how long a kept-alive API or proxy HTTP connection may wait for its next request")
	f.StringVar(&o.maxHeaderSize, "max-header-size", "64K", "largest request headers the API and the proxy read (past it: 431)")
	f.IntVar(&o.apiMaxUnauth, "api-max-unauthenticated-conns", connlimit.DefaultHTTP.MaxPending, "API connections not yet authenticated and not in a request; past it the oldest is closed")
	f.IntVar(&o.proxyMaxPending, "proxy-max-pending-conns", connlimit.DefaultHTTP.MaxPending, "connections per proxy HTTP port not in a request; past it the oldest is closed")
	f.IntVar(&o.tcpMaxConns, "tcp-max-conns", proxy.DefaultTCPMaxConns, "open connections per raw TCP port; past it new ones are closed at once")
	f.DurationVar(&o.tcpIdle, "tcp-idle-timeout", proxy.DefaultTCPIdleTimeout, "a raw TCP connection that passes no byte either way for this long is closed")
	return c
}

// MaxClockSkew is how far a host's clock may be from the database's when it joins.
const MaxClockSkew = 2 * time.Second

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
	for _, s := range o.egressAllow {
		p, err := netip.ParsePrefix(s)
		if err != nil || !p.Addr().Is4() {
			return cfg, errdefs.Invalid("--egress-allow %q: want an IPv4 prefix like 10.1.2.0/24", s)
		}
		cfg.EgressAllow = append(cfg.EgressAllow, p)
	}
	return cfg, nil
}

func runServer(ctx context.Context, dataDir string, o serverOptions) error {
	listen := o.listen
	if o.idle <= 0 || o.wake <= 0 {
		return errdefs.Invalid("--idle-timeout and --wake-timeout must be positive durations, like 5m")
	}
	httpLim, err := o.httpLimits()
	if err != nil {
		return err
	}
	if err := privateDataDir(dataDir); err != nil {
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
	dsn := o.db
	if dsn == "" {
		dsn = filepath.Join(dataDir, "kiln.db")
	}
	db, err := sqlstore.Open(ctx, dsn)
	if err != nil {
		return err
	}
	defer db.Close()
	if sqlstore.IsPostgres(dsn) {
		// The first host's token is everyone's: API calls and registry pulls between
		// hosts carry it.
		shared, err := db.Setting(ctx, "admin_token", tok)
		if err != nil {
			return err
		}
		if shared != tok {
			tok = shared
			atomicfile.WriteFile(filepath.Join(dataDir, "admin-token"), []byte(tok+"\n"), 0o600)
			fmt.Fprintf(os.Stderr, "kiln: using the cluster's admin token (written to %s)\n", filepath.Join(dataDir, "admin-token"))
		}
	}
	uids, err := vmrun.ParseUIDRange(o.vmUIDs)
	if err != nil {
		return fmt.Errorf("--vm-uids: %w", err)
	}
	rt, accel, err := runtime(ctx, dataDir, "qemu", "", "", os.Stderr)
	if err != nil {
		return err
	}
	rt.UIDs = uids
	// Listen first: the built-in registry's address is where machines pull localhost/ images.
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w (another kiln server? choose one with --listen)", listen, err)
	}
	images := image.Registries{Local: ln.Addr().String(), Token: tok}
	if sqlstore.IsPostgres(dsn) {
		images.Peers = func(ctx context.Context) []string { return peerRegistries(ctx, db) }
	}
	reg := registry.Handler(ctx, filepath.Join(dataDir, "registry"), tok)
	imageMax, err := parseSize(o.imageMaxSize)
	if err != nil || imageMax < 16<<20 {
		return errdefs.Invalid("--image-max-size %q: want a size of at least 16M, like 10G", o.imageMaxSize)
	}
	rootfs := rootfsCache(dataDir, imageMax)
	if err := rootfs.RemoveStale(); err != nil {
		return fmt.Errorf("cleaning interrupted image conversions: %w", err)
	}
	mgr := node.New(db, rt, images, rootfs, filepath.Join(dataDir, "machines"), os.Stderr)
	hostName, _ := os.Hostname()
	here := capacity.Host{Name: hostName, CPUs: stdruntime.NumCPU(), MemoryMiB: vmm.HostMemoryMiB(),
		CPURatio: o.cpuOvercommit, MemRatio: o.memOvercommit, ReserveCPUs: o.reserveCPUs, ReserveMemoryMiB: o.reserveMemory}
	if err := here.Validate(); err != nil {
		ln.Close()
		return fmt.Errorf("%w (flags --cpu-overcommit, --memory-overcommit, --reserve-cpus, --reserve-memory)", err)
	}
	if o.capacityWait < 0 {
		ln.Close()
		return errdefs.Invalid("--capacity-wait %s must not be negative", o.capacityWait)
	}
	ledger := capacity.NewLedger(here)
	mgr.Capacity, mgr.CapacityWait = ledger, o.capacityWait
	if o.hostName != "" {
		here.Name = o.hostName
		ledger = capacity.NewLedger(here)
		mgr.Capacity = ledger
	}
	advertise := o.advertise
	if advertise == "" {
		advertise = "http://" + ln.Addr().String()
	}
	// Heartbeats and leases compare clocks across hosts: one far off would look dead, or
	// never die.
	if skew, err := db.ClockSkew(ctx); err != nil {
		ln.Close()
		return err
	} else if skew > MaxClockSkew || skew < -MaxClockSkew {
		ln.Close()
		return errdefs.Invalid("this host's clock is %s off the database's (more than %s): fix its time (NTP) before it joins", skew.Round(time.Millisecond), MaxClockSkew)
	}
	if err := db.RegisterHost(ctx, store.Host{Name: here.Name, APIURL: advertise, CPUs: here.CPUs, MemoryMiB: here.MemoryMiB,
		CPURatio: here.CPURatio, MemRatio: here.MemRatio, ReserveCPUs: here.ReserveCPUs, ReserveMemoryMiB: here.ReserveMemoryMiB, HeartbeatAt: time.Now()}); err != nil {
		ln.Close()
		return fmt.Errorf("registering host %s: %w", here.Name, err)
	}
	// The host registry also carries cordons on a single host.
	var cluster store.Hosts = db
	if sqlstore.IsPostgres(dsn) {
		// Hosts share the database: new machines go where they fit best, each host runs
		// those placed on it, and calls about another host's machine go there.
		mgr.Host = here.Name
		mgr.Place = func(ctx context.Context, size capacity.Size) (string, error) {
			return placeMachine(ctx, db, mgr, size)
		}
	}
	hbctx, stopHeartbeat := context.WithCancel(ctx)
	defer stopHeartbeat()
	go heartbeat(hbctx, db, ledger, here.Name)
	var nets *network.Manager
	if o.network {
		cfg, err := o.netConfig()
		if err != nil {
			ln.Close()
			return err
		}
		// git for `kiln build --git` runs on the host, for callers: its uid is held to
		// the machines' egress policy. nobody is no uid of kiln's to write rules for.
		if cred, name := build.GitUser(); name == build.GitUserName {
			cfg.ConfineUIDs = []uint32{cred.Uid}
		} else if cred != nil {
			fmt.Fprintf(os.Stderr, "kiln: warning: build --git fetches run as %s, outside the egress policy (they can reach private addresses): create the system user %s (scripts/setup.sh does)\n", name, build.GitUserName)
		}
		if nets, err = network.Open(filepath.Join(dataDir, "network"), cfg, os.Stderr); err != nil {
			ln.Close()
			return err
		}
		defer nets.Close()
		mgr.Net = nets
		blockKilnHosts(ctx, nets, dsn)
		go blockPeers(hbctx, db, nets)
	}
	var px *proxy.Proxy
	if o.proxyListen != "off" {
		if !o.network {
			ln.Close()
			return errdefs.Invalid("the proxy reaches machines over their private network: with --network=false, also give --proxy-listen off")
		}
		px = proxy.New(proxyMachines{db: db, mgr: mgr, nets: nets, wake: o.wake}, proxy.Config{
			HTTPAddr: o.proxyListen, Domain: o.domain, IdleTimeout: o.idle, WakeTimeout: o.wake, Log: os.Stderr,
			HTTP: httpLim.Pending(o.proxyMaxPending, ""), TCPMaxConns: o.tcpMaxConns, TCPIdleTimeout: o.tcpIdle})
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
	if builds != nil {
		builds.Builders.Capacity, builds.Builders.CapacityWait = ledger, o.capacityWait
		if nets != nil {
			builds.Builders.Net = nets
		}
		if mgr.Host != "" {
			builds.Host, builds.Hosts = mgr.Host, db
		}
	}
	o.registerLimits(here, builds)
	apiSrv := &server.Server{Store: db, Node: mgr, Images: images, Registry: reg, Token: tok, Builds: builds, Hosts: cluster, HostName: here.Name,
		Capacity: ledger, Limits: limits.Default}
	apiSrv.Recovering.Store(true)
	srv, apiLn := connlimit.NewServer(ln, apiSrv.Handler(), httpLim.Pending(o.apiMaxUnauth, "the API (--api-max-unauthenticated-conns)"))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(apiLn) }()
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
	if mgr.Host != "" {
		cctx, stopClaims := context.WithCancel(ctx)
		defer stopClaims()
		go func() {
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-cctx.Done():
					return
				case <-t.C:
					mgr.Claim(cctx)
				}
			}
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

// imageMaxBytes is --image-max-size in bytes; runServer has checked it parses.
func (o serverOptions) imageMaxBytes() int64 {
	n, _ := parseSize(o.imageMaxSize)
	return n
}

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
	if o.gitTimeout <= 0 {
		return nil, errdefs.Invalid("--build-git-timeout %s: want a positive duration, like 5m", o.gitTimeout)
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
		KeepImages:      o.imagesKept,
		Git:             build.GitOptions{AllowFile: o.gitAllowFile, Timeout: o.gitTimeout},
		Log:             os.Stderr,
	}, nil
}

// registerLimits lists every limit this server enforces, with its value and where it
// was set, in the registry `kiln limits show` prints.
func (o serverOptions) registerLimits(h capacity.Host, b *build.Service) {
	r := limits.Default
	src := func(flag string) string {
		switch {
		case o.fromFile[flag]:
			return "config file (" + flag + ")"
		case o.changed != nil && o.changed(flag):
			return "flag --" + flag
		}
		return "default (flag --" + flag + ")"
	}
	r.Set("host.cpus_offered", h.AllowedCPUs(), "vCPUs", src("cpu-overcommit"), fmt.Sprintf("(%d CPUs − %d reserved) × %.2g overcommit: the vCPUs running machines and builders may hold", h.CPUs, h.ReserveCPUs, h.CPURatio))
	r.Set("host.memory_offered", h.AllowedMemoryMiB(), "MiB", src("memory-overcommit"), fmt.Sprintf("(%d MiB − %d reserved) × %.2g overcommit: the memory running machines and builders may hold", h.MemoryMiB, h.ReserveMemoryMiB, h.MemRatio))
	r.Set("host.cpu_overcommit", h.CPURatio, "×", src("cpu-overcommit"), fmt.Sprintf("1 to %d", capacity.MaxCPURatio))
	r.Set("host.memory_overcommit", h.MemRatio, "×", src("memory-overcommit"), fmt.Sprintf("1 to %d", capacity.MaxMemRatio))
	r.Set("host.reserve_cpus", h.ReserveCPUs, "CPUs", src("reserve-cpus"), "kept for the host, never offered")
	r.Set("host.reserve_memory", h.ReserveMemoryMiB, "MiB", src("reserve-memory"), "kept for the host, never offered")
	r.Set("image.max_size", o.imageMaxBytes(), "bytes", src("image-max-size"), "uncompressed size of an image being converted: the layers read and the files written")
	r.Set("image.max_entries", image.DefaultMaxEntries, "entries", "built in", "tar entries across an image's layers")
	r.Set("image.max_path", image.DefaultMaxPathLen, "bytes", "built in", "length of a path or link target in an image")
	r.Set("capacity.queue_wait", o.capacityWait, "", src("capacity-wait"), "how long a start waits for room before it fails naming the resource")
	r.Set("machine.cpus", fmt.Sprintf("1-%d", h.CPUs), "vCPUs", "the host's CPUs", "vCPUs of one machine")
	r.Set("machine.memory", fmt.Sprintf("%d-%d", vmm.MinMemoryMiB, h.MemoryMiB-256), "MiB", "the host's memory less 256 MiB", "memory of one machine")
	r.Set("machine.logs_kept", machinelog.LogCap, "bytes", "built in", "workload output kept per machine on the host; oldest dropped first")
	r.Set("machine.guest_output_buffer", agent.OutputCap, "bytes", "built in", "workload output the guest keeps while the host is away")
	r.Set("vm.cpu", "vCPUs × 100", "ms per 100 ms", "built in", "CPU time a VM's cgroup allows its VMM: its vCPUs, no more")
	r.Set("vm.memory_overhead", vmrun.DefaultMemoryOverheadMiB, "MiB", "built in (QEMU under TCG measured ~180 MiB)", "memory a VM's cgroup allows its VMM beyond the VM's RAM")
	r.Set("vm.users", o.vmUIDs, "uids", src("vm-uids"), "host users VMMs run as, one per VM")
	r.Set("machine.console_log", vmm.ConsoleLogCap, "bytes", "built in", "guest console kept per VM on the host, in two files; oldest dropped first")
	r.Set("exec.output", node.ExecOutputCap, "bytes", "built in", "stdout and stderr each of a buffered exec; the rest is dropped and the answer says truncated (a streaming exec has none)")
	r.Set("exec.timeout_max", node.MaxExecTimeout, "", "built in", "longest timeout an exec may ask for, and the timeout of one that asks for none (an interactive session included); a longer one is refused")
	r.Set("network.apps", 1<<(24-mustPrefix(o.pool).Bits()), "apps", src("network-pool"), "apps with a private /24 in the pool")
	r.Set("network.machines_per_app", 253, "machines", "built in (a /24)", "machines on one app's network")
	allowed := "none"
	if len(o.egressAllow) > 0 {
		allowed = strings.Join(o.egressAllow, ", ")
	}
	r.Set("network.egress_allow", allowed, "", src("egress-allow"), "ranges machines and builders may reach beyond the internet")
	r.Set("network.egress_blocked", network.BlockedByDefault, "", "built in", "ranges machines and builders may not reach unless allowed; this host, the database and peer hosts are never reachable")
	r.Set("proxy.soft_limit", proxy.DefaultSoftLimit, "requests", "default (service concurrency.soft_limit)", "per machine before the proxy prefers another or starts one")
	r.Set("proxy.hard_limit", proxy.DefaultHardLimit, "requests", "default (service concurrency.hard_limit)", "per machine; past it requests wait")
	r.Set("proxy.wake_timeout", o.wake, "", src("wake-timeout"), "how long a request waits for a machine to start or resume")
	r.Set("proxy.idle_timeout", o.idle, "", src("idle-timeout"), "idle time before autostop stops or suspends a machine")
	hdr, _ := parseSize(o.maxHeaderSize)
	r.Set("http.header_timeout", o.headerTimeout, "", src("header-timeout"), "time an API or proxy HTTP client has to send a request's headers; then its connection is closed")
	r.Set("http.idle_timeout", o.connIdle, "", src("conn-idle-timeout"), "time a kept-alive API or proxy HTTP connection may wait for its next request")
	r.Set("http.max_header_bytes", hdr, "bytes", src("max-header-size"), "request headers the API and the proxy read; larger ones get 431")
	r.Set("api.unauthenticated_conns", o.apiMaxUnauth, "connections", src("api-max-unauthenticated-conns"), "API connections not yet authenticated and not in a request; past it the oldest is closed")
	r.Set("proxy.pending_conns", o.proxyMaxPending, "connections", src("proxy-max-pending-conns"), "per proxy HTTP port, connections not in a request; past it the oldest is closed")
	r.Set("proxy.tcp_conns", o.tcpMaxConns, "connections", src("tcp-max-conns"), "open connections per raw TCP port; past it new ones are closed at once")
	r.Set("proxy.tcp_idle_timeout", o.tcpIdle, "", src("tcp-idle-timeout"), "a raw TCP connection passing no byte either way for this long is closed, both sides")
	r.Set("process.open_files", connlimit.OpenFileLimit(), "files", "RLIMIT_NOFILE (Go raises the soft limit to the hard one, less 1, at start)", "descriptors the server may hold; the connection caps keep floods under it")
	r.Set("image.upload", int64(8<<30), "bytes", "built in", "largest image tarball accepted by POST /v1/images")
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

// httpLimits are the API's and the proxy's limits on slow clients, from the flags; a
// caller sets its own cap on pending connections.
func (o serverOptions) httpLimits() (connlimit.HTTP, error) {
	hdr, err := parseSize(o.maxHeaderSize)
	if err != nil || hdr < 4<<10 || hdr > 1<<30 {
		return connlimit.HTTP{}, errdefs.Invalid("--max-header-size %q: want a size from 4K to 1G, like 64K", o.maxHeaderSize)
	}
	if o.headerTimeout <= 0 || o.connIdle <= 0 || o.tcpIdle <= 0 {
		return connlimit.HTTP{}, errdefs.Invalid("--header-timeout, --conn-idle-timeout and --tcp-idle-timeout must be positive durations, like 10s")
	}
	if o.apiMaxUnauth < 1 || o.proxyMaxPending < 1 || o.tcpMaxConns < 1 {
		return connlimit.HTTP{}, errdefs.Invalid("--api-max-unauthenticated-conns, --proxy-max-pending-conns and --tcp-max-conns must be at least 1")
	}
	if files := connlimit.OpenFileLimit(); files > 0 && uint64(o.apiMaxUnauth+o.proxyMaxPending+2*o.tcpMaxConns) >= files {
		fmt.Fprintf(os.Stderr, "kiln: the connection caps (--api-max-unauthenticated-conns, --proxy-max-pending-conns, twice --tcp-max-conns) add up to more than the %d files this process may open: raise its hard limit (systemd LimitNOFILE) or lower them\n", files)
	}
	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, "kiln: "+format+"\n", args...) }
	return connlimit.HTTP{HeaderTimeout: o.headerTimeout, IdleTimeout: o.connIdle, MaxHeaderBytes: int(hdr), Log: logf}, nil
}

func mustPrefix(s string) netip.Prefix {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return network.DefaultPool
	}
	return p
}

// heartbeat tells the database this host is alive every two seconds and applies a
// cordon set through any host. While the database is unreachable it says so once, and
// again when it is back; machines keep running meanwhile.
func heartbeat(ctx context.Context, db *sqlstore.DB, ledger *capacity.Ledger, name string) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	down := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := db.Heartbeat(ctx, name, time.Now())
		var hosts []store.Host
		if err == nil {
			hosts, err = db.ListHosts(ctx)
		}
		if err != nil {
			if !down && ctx.Err() == nil {
				fmt.Fprintf(os.Stderr, "kiln: the database does not answer (%v); running machines go on, and changes wait for it\n", err)
			}
			down = true
			continue
		}
		if down {
			fmt.Fprintln(os.Stderr, "kiln: the database answers again")
			down = false
		}
		for _, h := range hosts {
			if h.Name != name {
				continue
			}
			if was := ledger.Cordoned(name); was != h.Cordoned {
				ledger.SetCordoned(name, h.Cordoned)
				if h.Cordoned {
					fmt.Fprintf(os.Stderr, "kiln: host %s is cordoned: it takes no new machines or builders\n", name)
				} else {
					fmt.Fprintf(os.Stderr, "kiln: host %s is uncordoned: it takes new work again\n", name)
				}
			}
		}
	}
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

// blockKilnHosts keeps machines away from the database's host: in a cluster it holds
// the admin token in clear.
func blockKilnHosts(ctx context.Context, nets *network.Manager, dsn string) {
	if !sqlstore.IsPostgres(dsn) {
		return // a SQLite file on this host, whose addresses are closed anyway
	}
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return // Open parsed it already
	}
	hosts := []string{cfg.Host}
	for _, f := range cfg.Fallbacks {
		hosts = append(hosts, f.Host)
	}
	addrs, err := network.ResolveHosts(ctx, hosts)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kiln: machines' egress: %v; those database addresses are not blocked\n", err)
	}
	if err := nets.BlockHosts(ctx, "database", addrs); err != nil {
		fmt.Fprintf(os.Stderr, "kiln: machines' egress: blocking the database: %v\n", err)
	}
}

// blockPeers keeps machines away from every host sharing the database (their APIs and
// registries), as hosts join, every few seconds.
func blockPeers(ctx context.Context, db *sqlstore.DB, nets *network.Manager) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		if hs, err := db.ListHosts(ctx); err == nil {
			var names []string
			for _, h := range hs {
				if u, err := url.Parse(h.APIURL); err == nil {
					names = append(names, u.Hostname())
				}
			}
			addrs, _ := network.ResolveHosts(ctx, names)
			if err := nets.BlockHosts(ctx, "peers", addrs); err != nil && ctx.Err() == nil {
				fmt.Fprintf(os.Stderr, "kiln: machines' egress: blocking peer hosts: %v\n", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// liveHosts lists the hosts whose heartbeat is recent.
func liveHosts(ctx context.Context, db *sqlstore.DB) ([]store.Host, error) {
	hs, err := db.ListHosts(ctx)
	if err != nil {
		return nil, err
	}
	var out []store.Host
	for _, h := range hs {
		if time.Since(h.HeartbeatAt) <= server.HostDownAfter {
			out = append(out, h)
		}
	}
	return out, nil
}

// peerRegistries lists the live hosts' registries (their API address serves /v2/).
func peerRegistries(ctx context.Context, db *sqlstore.DB) []string {
	hs, _ := liveHosts(ctx, db)
	var out []string
	for _, h := range hs {
		if u, err := url.Parse(h.APIURL); err == nil && u.Host != "" {
			out = append(out, u.Host)
		}
	}
	return out
}

// placeMachine picks the live, uncordoned host with the most room for a new machine.
func placeMachine(ctx context.Context, db *sqlstore.DB, mgr *node.Manager, size capacity.Size) (string, error) {
	hs, err := liveHosts(ctx, db)
	if err != nil {
		return "", err
	}
	used, err := mgr.UsageByHost(ctx)
	if err != nil {
		return "", err
	}
	var hosts []capacity.Host
	for _, h := range hs {
		hosts = append(hosts, capacity.Host{Name: h.Name, CPUs: h.CPUs, MemoryMiB: h.MemoryMiB, CPURatio: h.CPURatio, MemRatio: h.MemRatio,
			ReserveCPUs: h.ReserveCPUs, ReserveMemoryMiB: h.ReserveMemoryMiB, Cordoned: h.Cordoned})
	}
	return capacity.Place(hosts, used, capacity.Request{Size: size})
}
