// Package daemon assembles a kiln server: it opens the store, prepares the VM runtime on
// the chosen VMM, joins the cluster, opens the network, the proxy and the API, and runs
// them until its context ends. Each part is made with its dependencies, in one order;
// each pushes its cleanup on one stack, which unwinds on a failed start and at shutdown.
//
// cmd/kiln parses `kiln server`'s flags into Options and calls Run; nothing else does.
package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	stdruntime "runtime"
	"time"

	"github.com/kilnhq/kiln/internal/assets"
	"github.com/kilnhq/kiln/internal/auditlog"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/cluster"
	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/deploy"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/limits"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/proxy"
	"github.com/kilnhq/kiln/internal/registry"
	"github.com/kilnhq/kiln/internal/secrets"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/serverlog"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// shutdownGrace is how long requests in flight get at shutdown.
const shutdownGrace = 5 * time.Second

// Run runs a server until ctx ends (nil: a clean stop) or its API fails. Machines keep
// running when it returns; the next Run adopts them.
func Run(ctx context.Context, o Options, h Host) error {
	if err := o.check(); err != nil {
		return err
	}
	// One logger for the whole server (--log-format); the parts that log lines to a
	// writer get one that makes each line a record, and so does the log package (the
	// HTTP servers' complaints): every line on stderr is of the one format.
	logger, err := serverlog.New(os.Stderr, o.LogFormat)
	if err != nil {
		return err
	}
	slog.SetDefault(logger)
	log := serverlog.Writer(logger)
	logf := func(format string, args ...any) { logger.Info(fmt.Sprintf(format, args...)) }
	hostName, _ := os.Hostname()
	here, err := o.here(hostName, stdruntime.NumCPU(), vmm.HostMemoryMiB())
	if err != nil {
		return err
	}
	var stack cleanups
	defer stack.unwind()

	dataDir := o.DataDir
	if err := privateDataDir(dataDir); err != nil {
		return err
	}
	h.Reap(ctx, log)
	dsn := o.DB
	if dsn == "" {
		dsn = filepath.Join(dataDir, "kiln.db")
	}
	shared := sqlstore.IsPostgres(dsn)
	db, err := sqlstore.Open(ctx, dsn)
	if err != nil {
		return err
	}
	stack.push(func() { db.Close() })
	key, cred, err := tokenKey(ctx, o, db, shared, logf)
	if err != nil {
		return err
	}
	tok, changed, err := writeAdminToken(dataDir, key)
	if err != nil {
		return err
	}
	if changed {
		logf("wrote the operator's token: %s (tokens for apps and projects: `kiln tokens create`)", filepath.Join(dataDir, "admin-token"))
	} else {
		logf("operator's token: %s", filepath.Join(dataDir, "admin-token"))
	}
	checker := &auth.Checker{Key: key, Tokens: db}
	uids, _ := vmrun.ParseUIDRange(o.VMUIDs) // check read it
	rt, accel, err := h.Runtime(ctx, o.VMM, log)
	if err != nil {
		return err
	}
	rt.UIDs = uids

	// Listen first: the built-in registry's address is where machines pull localhost/ images.
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w (another kiln server? choose one with --listen)", o.Listen, err)
	}
	stack.push(func() { ln.Close() })
	advertise := o.Advertise
	if advertise == "" {
		advertise = "http://" + ln.Addr().String()
	}
	peers, err := listenPeers(o, cred, here.Name, ln.Addr(), advertise)
	if err != nil {
		return err
	}
	if peers != nil {
		stack.push(func() { peers.ln.Close() })
	}
	ledger := capacity.NewLedger(here)

	var nets *network.Manager
	if o.Network {
		if nets, err = openNetwork(ctx, o, dataDir, dsn, log); err != nil {
			return err
		}
		stack.push(func() { nets.Close() })
	}
	// The host registry carries cordons on a single host too; with PostgreSQL, hosts
	// share it: new machines go where they fit best, each host runs those placed on it,
	// and calls about another host's machine go there.
	ccfg := cluster.Config{Store: db, Here: here, APIURL: advertise, PeerURL: peers.URL(), Shared: shared, Ledger: ledger, Log: log}
	if nets != nil {
		ccfg.Net = nets
	}
	hosts := cluster.New(ccfg)
	if err := hosts.Join(ctx); err != nil {
		return err
	}
	bg := background(ctx, &stack)
	bg.run(hosts.Heartbeat)
	if nets != nil {
		bg.run(func(ctx context.Context) { blockPeers(ctx, hosts, nets, logf) })
	}

	rules := registry.Rules{Shared: o.SharedImages}
	audit := &auditlog.Limited{Audit: db}
	images := image.Registries{Local: ln.Addr().String(), Token: tok}
	if shared {
		images.Peers, images.PeerTransport = hosts.PeerRegistries, peers.Transport()
	}
	reg := registry.Handler(ctx, filepath.Join(dataDir, "registry"), registry.Access{Auth: checker, Rules: rules, Audit: audit, Log: logf})
	rootfs := RootfsCache(dataDir, o.ImageMaxBytes)
	if err := rootfs.RemoveStale(); err != nil {
		return fmt.Errorf("cleaning interrupted image conversions: %w", err)
	}
	builds, err := buildService(ctx, o, h, db, rt, images, logger)
	if err != nil {
		return err
	}
	if builds != nil {
		if nets != nil {
			builds.Builders.Net = nets
		}
		// A build reads and tags images as its project, whoever submitted it.
		builds.MayPull, builds.MayTag = projectImages(images, rules.MayPull), projectImages(images, rules.MayPush)
		if shared {
			builds.Host, builds.Hosts = here.Name, db
			builds.Builders.Host = here.Name // a builder per host, like its cache
		}
	}
	apps, err := appSecrets(o, db)
	if err != nil {
		return err
	}
	mgr := newMachines(o, db, rt, images, rootfs, ledger, nets, hosts, builds, logger)
	mgr.UseSecrets(apps.Values)
	stack.push(mgr.Close)

	httpLim, _ := o.httpLimits() // check read it
	httpLim.Log = logf
	if files := connlimit.OpenFileLimit(); files > 0 && uint64(o.APIMaxUnauth+o.ProxyMaxPending+2*o.TCPMaxConns) >= files {
		logf("the connection caps (--api-max-unauthenticated-conns, --proxy-max-pending-conns, twice --tcp-max-conns) add up to more than the %d files this process may open: raise its hard limit (systemd LimitNOFILE) or lower them", files)
	}
	var px *proxy.Proxy
	if o.ProxyListen != "off" {
		px = proxy.New(proxyMachines{db: db, mgr: mgr, nets: nets, wake: o.Wake}, proxy.Config{
			HTTPAddr: o.ProxyListen, Domain: o.Domain, IdleTimeout: o.Idle, WakeTimeout: o.Wake, Log: log,
			HTTP: httpLim.Pending(o.ProxyMaxPending, ""), TCPMaxConns: o.TCPMaxConns, TCPIdleTimeout: o.TCPIdle})
		if err := px.Listen(); err != nil {
			return err
		}
	}
	registerLimits(limits.Default, o, here, builds)

	apiSrv := &server.Server{Cluster: hosts, Peers: peers.Transport(), Store: db, Node: mgr, Images: images, Registry: reg, Auth: checker, Access: struct {
		store.Tokens
		store.Audit
	}{db, audit}, ImageRules: rules, Log: logger, Builds: builds,
		Capacity: ledger, Limits: limits.Default, Events: db, Secrets: apps}
	deploys := &deploy.Engine{Store: db, Machines: deployMachines{db: db, mgr: mgr}, Log: logger}
	if px != nil {
		deploys.Health = deployHealth{px}
	}
	apiSrv.Deploys = deploys
	dctx, stopDeploys := context.WithCancel(ctx)
	deploys.Base = dctx
	stack.push(func() { stopDeploys(); deploys.Wait() })
	// /metrics reads machines by state from the store (with PostgreSQL: every host's),
	// capacity from the ledger, and the usage of the machines running here.
	apiSrv.Metrics = metrics.NewRegistry(metrics.MachineStates{Count: db.MachineCounts}, metrics.Capacity{Ledger: ledger},
		metrics.Instances{List: mgr.Usage})
	apiSrv.Recovering.Store(true)
	handler := apiSrv.Handler()
	srv, apiLn := connlimit.NewServer(ln, handler, httpLim.Pending(o.APIMaxUnauth, "the API (--api-max-unauthenticated-conns)"))
	srv.RegisterOnShutdown(apiSrv.EndStreams)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(apiLn) }()
	stack.push(func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
		defer cancel()
		srv.Shutdown(sctx)
	})
	peers.serve(ctx, handler, httpLim.Pending(o.APIMaxUnauth, "the peer listener (--api-max-unauthenticated-conns)"), &stack, logf)
	// Recovery may need images from the registry, so it runs once the server serves;
	// the API answers 503 until it is done.
	if err := mgr.Recover(ctx); err != nil {
		return fmt.Errorf("recovering machines: %w", err)
	}
	// Deploys a stopped server left resume now that their machines are adopted, before
	// the API takes calls; on stopping, the running ones are left where they are, to
	// resume at the next start.
	if shared {
		if left, _ := db.ReleasesInState(ctx, store.ReleaseRunning, store.ReleasePending); len(left) > 0 {
			logf("%d deploys are recorded running; on a shared database kiln does not resume them (another host may run them): a deploy of their app is refused until one has been untouched for over an hour", len(left))
		}
	} else if err := deploys.Resume(ctx); err != nil {
		return fmt.Errorf("resuming deploys: %w", err)
	}
	apiSrv.Recovering.Store(false)
	if builds != nil {
		// Builders are machines: like them they keep running when kiln stops, and the
		// next kiln adopts them with their caches (an interrupted build goes on in the
		// same builder).
		background(ctx, &stack).run(builds.Run)
	}
	late := background(ctx, &stack)
	late.run(mgr.SweepSnapshots) // volume snapshots: retention and daily backups
	late.run(func(ctx context.Context) {
		auditlog.Prune(ctx, logf,
			auditlog.Retention{What: "audit entries", Flag: "--audit-retention", Keep: o.AuditRetention, Prune: db.PruneAudit},
			auditlog.Retention{What: "events", Flag: "--event-retention", Keep: o.EventRetention, Prune: db.PruneEvents})
	})
	if shared {
		late.run(func(ctx context.Context) { hosts.ClaimEvery(ctx, mgr) })
	}
	if px != nil {
		late.run(px.Run)
		logf("proxy serves http://<app>.%s on %s", o.Domain, px.Addr())
	}
	logf("serving the API and the image registry on http://%s (accelerator %s)", ln.Addr(), accel)
	select {
	case <-ctx.Done():
	case err := <-errc:
		return err
	}
	stack.unwind()
	logf("stopped; machines keep running and are adopted at the next start")
	return nil
}

// newMachines makes the machines service: the one place its dependencies are chosen.
// Builders are machines of its own (build.BuildersApp), so builds, if on, use it.
func newMachines(o Options, db *sqlstore.DB, rt *vmrun.Runtime, images image.Registries, rootfs image.Cache,
	ledger *capacity.Ledger, nets *network.Manager, hosts *cluster.Cluster, builds *build.Service, log *slog.Logger) *machines.Service {
	cfg := machines.Config{Store: db, VMs: rt, Images: images, Rootfs: rootfs, Dir: filepath.Join(o.DataDir, "machines"), Log: log,
		Capacity: ledger, CapacityWait: o.CapacityWait, Host: hosts.HomeHost()}
	if nets != nil {
		cfg.Net = nets
	}
	if hosts.Shared() {
		cfg.Place = hosts.Place
	}
	if builds != nil {
		cfg.Internal = map[string]machines.Internal{build.BuildersApp: builds.Builders}
	}
	ms := machines.New(cfg)
	if builds != nil {
		builds.Builders.Use(ms)
	}
	return ms
}

// group runs background loops under one context, cancelled and waited for by the
// cleanup pushed when the group is made.
type group struct {
	ctx  context.Context
	done []chan struct{}
}

// background starts a group whose loops stop, and are waited for, when the stack
// unwinds to it.
func background(ctx context.Context, stack *cleanups) *group {
	gctx, cancel := context.WithCancel(ctx)
	g := &group{ctx: gctx}
	stack.push(func() {
		cancel()
		for _, d := range g.done {
			<-d
		}
	})
	return g
}

func (g *group) run(loop func(ctx context.Context)) {
	d := make(chan struct{})
	g.done = append(g.done, d)
	go func() {
		defer close(d)
		loop(g.ctx)
	}()
}

// RootfsCache is where converted images live; the server and `kiln vm run --image`
// share it.
func RootfsCache(dataDir string, maxBytes int64) image.Cache {
	return image.Cache{Dir: filepath.Join(dataDir, "images", "rootfs"), Limits: image.Limits{MaxBytes: maxBytes}}
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

// buildService sets up builds, or returns nil (builds off, said in the log) where the
// builder root filesystem is missing.
func buildService(ctx context.Context, o Options, h Host, db *sqlstore.DB, rt *vmrun.Runtime, images image.Registries, log *slog.Logger) (*build.Service, error) {
	rootfs, err := assets.EnsureBuilder(ctx, assets.Options{Dir: h.AssetsDir}, h.Buildkitd)
	if err != nil {
		log.Warn(fmt.Sprintf("builds are off: %v", err))
		return nil, nil
	}
	return &build.Service{
		Store: db,
		Builders: &build.Builders{RT: rt, Rootfs: rootfs, Dir: filepath.Join(o.DataDir, "builders"),
			CacheBytes: o.BuildCacheBytes, KeepBytes: o.BuildCacheBytes * 6 / 10, CPUs: o.BuilderCPUs, MemoryMiB: o.BuilderMemory,
			Idle: o.BuilderIdle, Log: serverlog.Writer(log)},
		Bases:           &build.Bases{Dir: filepath.Join(o.DataDir, "build-bases")},
		Images:          images,
		Dir:             filepath.Join(o.DataDir, "builds"),
		MaxContextBytes: o.BuildMaxContext,
		MaxLogBytes:     16 << 20,
		MaxAttempts:     3,
		Backoff:         2 * time.Second,
		MaxConcurrent:   o.MaxBuilds,
		KeepImages:      o.ImagesKept,
		Git:             build.GitOptions{AllowFile: o.GitAllowFile, Timeout: o.GitTimeout},
		Log:             log,
	}, nil
}

// appSecrets opens the keyring that seals apps' secrets: the operator's file, which must
// exist, or one kept in the data directory.
func appSecrets(o Options, db *sqlstore.DB) (*secrets.Apps, error) {
	var kr *secrets.Keyring
	var err error
	if o.SecretsKey != "" {
		kr, err = secrets.Load(o.SecretsKey)
	} else {
		kr, err = secrets.LoadOrCreate(filepath.Join(o.DataDir, "secrets.key"))
	}
	if err != nil {
		return nil, fmt.Errorf("the secrets key (--secrets-key): %w", err)
	}
	return &secrets.Apps{Store: db, Keyring: kr}, nil
}
