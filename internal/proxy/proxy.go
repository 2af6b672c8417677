// Package proxy is kiln's front door for machines' services. It routes HTTP by Host
// name (<app>.<domain>) and raw TCP by port to an app's machines over their private
// network, preferring the least loaded machine that passes its health checks. When no
// machine can take a request it starts or resumes one and holds the request meanwhile,
// and it stops or suspends machines that stayed idle, keeping min_machines_running.
//
// The proxy never changes a machine itself: it asks Machines, which goes through the
// node like any API call, so every state change still happens in one place.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/metrics"
)

// Target is a machine the proxy may send traffic to.
type Target struct {
	ID       string
	App      string
	State    machine.State
	Addr     netip.Addr
	Services []api.Service
	// Cordoned machines get no new requests and are not woken; their checks still run,
	// so that a deploy can see a new machine healthy before it takes traffic.
	Cordoned bool
}

// Machines is what the proxy needs of the node.
type Machines interface {
	Targets(ctx context.Context) ([]Target, error)
	// Start starts or resumes a machine and returns once it is started.
	Start(ctx context.Context, id string) error
	Stop(ctx context.Context, id string) error
	Suspend(ctx context.Context, id string) error
}

// Config tunes the proxy.
type Config struct {
	// HTTPAddr is the HTTP listener that stands for public port 80. Other public ports
	// get listeners of their own on HTTPAddr's host.
	HTTPAddr string
	Domain   string // default kiln.internal
	// IdleTimeout is how long a machine with autostop on may go without traffic.
	IdleTimeout time.Duration
	// WakeTimeout bounds how long a request waits for a machine to start and listen.
	WakeTimeout time.Duration
	// Refresh is how often the proxy reads machine states; default 250ms.
	Refresh time.Duration
	// HTTP bounds slow and hostile clients on each HTTP listener (connlimit.DefaultHTTP
	// where zero). Nothing authenticates there, so every connection not in a request
	// counts as pending.
	HTTP connlimit.HTTP
	// TCPMaxConns caps the open connections of each raw TCP port (default
	// DefaultTCPMaxConns); past it new ones are closed at once. TCPIdleTimeout (default
	// DefaultTCPIdleTimeout) closes a raw TCP connection that passed no byte either way
	// for that long.
	TCPMaxConns    int
	TCPIdleTimeout time.Duration
	Log            io.Writer
}

// Default concurrency limits, as Fly sets them.
const (
	DefaultSoftLimit = 20
	DefaultHardLimit = 25
)

// Defaults for raw TCP ports.
const (
	DefaultTCPMaxConns    = 1024
	DefaultTCPIdleTimeout = 10 * time.Minute
)

// Proxy serves machines' public ports.
type Proxy struct {
	cfg  Config
	m    Machines
	host string // where per-port listeners bind

	mu      sync.Mutex
	targets []Target
	stats   map[string]*stat
	ports   map[int]*portListener
	changed chan struct{} // closed and replaced whenever targets or loads change
	http    *portListener
}

// stat is the proxy's view of one machine.
type stat struct {
	inflight   int
	lastActive time.Time
	startedAt  time.Time // when the proxy first saw it started
	waking     bool
	stopping   bool
	failing    bool // a health check failed after the grace period
	checking   bool
	lastCheck  time.Time
	// rounds counts the check rounds finished since the machine was last seen started;
	// passed says whether the latest one passed.
	rounds int
	passed bool
}

// New returns a proxy; Run serves it.
func New(m Machines, cfg Config) *Proxy {
	if cfg.Domain == "" {
		cfg.Domain = "kiln.internal"
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = 5 * time.Minute
	}
	if cfg.WakeTimeout == 0 {
		cfg.WakeTimeout = 60 * time.Second
	}
	if cfg.Refresh == 0 {
		cfg.Refresh = 250 * time.Millisecond
	}
	cfg.HTTP = cfg.HTTP.WithDefaults()
	if cfg.TCPMaxConns <= 0 {
		cfg.TCPMaxConns = DefaultTCPMaxConns
	}
	if cfg.TCPIdleTimeout <= 0 {
		cfg.TCPIdleTimeout = DefaultTCPIdleTimeout
	}
	host, _, _ := net.SplitHostPort(cfg.HTTPAddr)
	return &Proxy{cfg: cfg, m: m, host: host, stats: map[string]*stat{}, ports: map[int]*portListener{}, changed: make(chan struct{})}
}

func (p *Proxy) logf(format string, args ...any) {
	if p.cfg.Log != nil {
		fmt.Fprintf(p.cfg.Log, "kiln: proxy: "+format+"\n", args...)
	}
}

// Listen opens the HTTP listener; call it before Run so that a taken address is an
// error at start-up.
func (p *Proxy) Listen() error {
	l, err := p.listen(80, p.cfg.HTTPAddr, true)
	if err != nil {
		return fmt.Errorf("proxy: listening on %s: %w (choose another with --proxy-listen)", p.cfg.HTTPAddr, err)
	}
	p.http = l
	return nil
}

// Addr is the HTTP listener's address.
func (p *Proxy) Addr() string { return p.http.ln.Addr().String() }

// Run refreshes the machine table, opens and closes port listeners, runs health checks
// and stops idle machines until ctx ends.
func (p *Proxy) Run(ctx context.Context) {
	t := time.NewTicker(p.cfg.Refresh)
	defer t.Stop()
	defer p.closeAll()
	for {
		p.refresh(ctx)
		p.stopIdle(ctx)
		p.check(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (p *Proxy) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.http != nil {
		p.http.Close()
	}
	for port, l := range p.ports {
		l.Close()
		delete(p.ports, port)
	}
}

// broadcast wakes every request waiting for a machine. Call with mu held.
func (p *Proxy) broadcast() {
	close(p.changed)
	p.changed = make(chan struct{})
}

func (p *Proxy) stat(id string) *stat {
	s := p.stats[id]
	if s == nil {
		s = &stat{}
		p.stats[id] = s
	}
	return s
}

// refresh reads the machines and opens a listener for every public port other than
// 80; raw TCP ports belong to one app (the node refuses a second).
func (p *Proxy) refresh(ctx context.Context) {
	ts, err := p.m.Targets(ctx)
	if err != nil {
		if ctx.Err() == nil {
			p.logf("reading machines: %v", err)
		}
		return
	}
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.targets = ts
	seen := map[string]bool{}
	want := map[int]bool{}
	for _, t := range ts {
		seen[t.ID] = true
		s := p.stat(t.ID)
		if t.State == machine.Started {
			if s.startedAt.IsZero() {
				s.startedAt, s.lastActive = now, now
			}
		} else {
			s.startedAt, s.failing, s.rounds, s.passed = time.Time{}, false, 0, false
			if t.State != machine.Stopping && t.State != machine.Suspending {
				s.stopping = false
			}
		}
		for _, svc := range t.Services {
			for _, port := range svc.Ports {
				if port.Port != 80 {
					want[port.Port] = len(port.Handlers) > 0
				}
			}
		}
	}
	for id, s := range p.stats {
		if !seen[id] && s.inflight == 0 {
			delete(p.stats, id)
		}
	}
	for port, l := range p.ports {
		if h, ok := want[port]; !ok || h != l.http {
			l.Close()
			delete(p.ports, port)
		}
	}
	for port, http := range want {
		if p.ports[port] != nil {
			continue
		}
		l, err := p.listen(port, net.JoinHostPort(p.host, strconv.Itoa(port)), http)
		if err != nil {
			p.logf("cannot serve port %d: %v", port, err)
			continue
		}
		p.ports[port] = l
	}
	p.broadcast()
}

// ErrNoService means no app serves the host or port asked for.
var ErrNoService = errors.New("no app serves this address")

// lease is one request's hold on a machine.
type lease struct {
	p      *Proxy
	target Target
	svc    api.Service
	st     *stat
	woken  bool
	// sent is when an HTTP request was handed to the machine.
	sent time.Time
}

func (l *lease) addr() string {
	return net.JoinHostPort(l.target.Addr.String(), strconv.Itoa(l.svc.InternalPort))
}

func (l *lease) release() {
	l.p.mu.Lock()
	l.st.inflight--
	l.st.lastActive = time.Now()
	l.p.broadcast()
	l.p.mu.Unlock()
}

func limits(svc api.Service) (soft, hard int) {
	soft, hard = DefaultSoftLimit, DefaultHardLimit
	if c := svc.Concurrency; c != nil {
		if c.SoftLimit > 0 {
			soft = c.SoftLimit
		}
		if c.HardLimit > 0 {
			hard = c.HardLimit
		}
		if soft > hard {
			soft = hard
		}
	}
	return soft, hard
}

// serviceOn returns the target's service on a public port, HTTP or not.
func serviceOn(t Target, port int, http bool) (api.Service, bool) {
	for _, svc := range t.Services {
		for _, p := range svc.Ports {
			if p.Port == port && (len(p.Handlers) > 0) == http {
				return svc, true
			}
		}
	}
	return api.Service{}, false
}

// acquire picks the machine of app that takes a request on port: the least loaded one
// under its soft limit; past that, a stopped or suspended one is started if autostart
// allows, while the least loaded one under its hard limit still takes the request. With
// nothing able to take it, the request waits for a machine to start or free up.
func (p *Proxy) acquire(ctx context.Context, app string, port int, http bool) (*lease, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.WakeTimeout)
	defer cancel()
	held := false
	defer func() {
		if held {
			metrics.ProxyHeld.WithLabelValues(app).Dec()
		}
	}()
	for {
		p.mu.Lock()
		var (
			known             bool
			underSoft, underH *Target
			softSvc, hardSvc  api.Service
			sleeping          []Target
			waking            bool
		)
		for i := range p.targets {
			t := &p.targets[i]
			if t.App != app {
				continue
			}
			svc, ok := serviceOn(*t, port, http)
			if !ok {
				continue
			}
			known = true
			s := p.stat(t.ID)
			switch {
			case s.waking:
				waking = true
			case t.Cordoned:
				// Taken out of service (a deploy is replacing it, or a new one is not
				// yet healthy): requests wait for, or go to, the others.
			case t.State == machine.Started && !s.stopping && !s.failing:
				soft, hard := limits(svc)
				if s.inflight < soft && (underSoft == nil || s.inflight < p.stats[underSoft.ID].inflight) {
					underSoft, softSvc = t, svc
				}
				if s.inflight < hard && (underH == nil || s.inflight < p.stats[underH.ID].inflight) {
					underH, hardSvc = t, svc
				}
			case (t.State == machine.Stopped || t.State == machine.Suspended) && svc.Autostart != nil && *svc.Autostart:
				sleeping = append(sleeping, *t)
			}
		}
		if !known {
			p.mu.Unlock()
			return nil, ErrNoService
		}
		pick, svc := underSoft, softSvc
		if pick == nil && len(sleeping) > 0 && !waking {
			// Everyone is busy or asleep: wake one (the request goes on to a busy
			// machine under its hard limit if there is one).
			p.wake(sleeping[0])
		}
		if pick == nil {
			pick, svc = underH, hardSvc
		}
		if pick != nil {
			s := p.stats[pick.ID]
			s.inflight++
			s.lastActive = time.Now()
			l := &lease{p: p, target: *pick, svc: svc, st: s}
			p.mu.Unlock()
			return l, nil
		}
		changed := p.changed
		p.mu.Unlock()
		if !held { // the app is known: its name is a real one
			held = true
			metrics.ProxyHeld.WithLabelValues(app).Inc()
		}
		select {
		case <-changed:
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return nil, fmt.Errorf("no machine of app %s could take the request within %s: all are busy, failing their checks or failed to start", app, p.cfg.WakeTimeout)
			}
			return nil, ctx.Err()
		}
	}
}

// wake starts or resumes a machine in the background and waits for its service ports
// to accept connections. Call with mu held.
func (p *Proxy) wake(t Target) {
	s := p.stat(t.ID)
	s.waking = true
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), p.cfg.WakeTimeout)
		defer cancel()
		start := time.Now()
		err := p.m.Start(ctx, t.ID)
		if err == nil {
			err = waitListening(ctx, t)
		}
		if err != nil {
			metrics.ProxyWakes.WithLabelValues(t.App, "failed").Inc()
			p.logf("waking machine %s of app %s: %v", t.ID, t.App, err)
		} else {
			metrics.ProxyWakes.WithLabelValues(t.App, "ok").Inc()
			metrics.ProxyWake.WithLabelValues(t.App).Observe(time.Since(start).Seconds())
			p.logf("woke machine %s of app %s (%s) in %s", t.ID, t.App, t.State, time.Since(start).Round(time.Millisecond))
		}
		p.mu.Lock()
		s.waking = false
		if err == nil {
			for i := range p.targets {
				if p.targets[i].ID == t.ID {
					p.targets[i].State = machine.Started
				}
			}
			now := time.Now()
			s.startedAt, s.lastActive, s.stopping = now, now, false
		}
		p.broadcast()
		p.mu.Unlock()
	}()
}

// waitListening waits until every service port of a machine accepts a connection.
func waitListening(ctx context.Context, t Target) error {
	for _, svc := range t.Services {
		addr := net.JoinHostPort(t.Addr.String(), strconv.Itoa(svc.InternalPort))
		for {
			c, err := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "tcp", addr)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("nothing listens on %s: %w", addr, err)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	return nil
}

// stopIdle stops or suspends machines with autostop on that had no traffic for the
// idle time, keeping each app's min_machines_running started.
func (p *Proxy) stopIdle(ctx context.Context) {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	running := map[string]int{}
	minRunning := map[string]int{}
	var idle []Target
	for _, t := range p.targets {
		s := p.stat(t.ID)
		if t.State != machine.Started || s.stopping {
			continue
		}
		running[t.App]++
		mode := autostop(t)
		for _, svc := range t.Services {
			minRunning[t.App] = max(minRunning[t.App], svc.MinMachinesRunning)
		}
		if mode != "off" && s.inflight == 0 && !s.waking && now.Sub(s.lastActive) >= p.cfg.IdleTimeout {
			idle = append(idle, t)
		}
	}
	// The longest idle go first.
	sort.Slice(idle, func(i, j int) bool { return p.stats[idle[i].ID].lastActive.Before(p.stats[idle[j].ID].lastActive) })
	for _, t := range idle {
		if running[t.App] <= minRunning[t.App] {
			continue
		}
		running[t.App]--
		st := p.stats[t.ID]
		st.stopping = true
		mode := autostop(t)
		p.logf("machine %s of app %s was idle for %s: %s", t.ID, t.App, p.cfg.IdleTimeout, map[string]string{"stop": "stopping it", "suspend": "suspending it"}[mode])
		go func() {
			var err error
			if mode == "suspend" {
				err = p.m.Suspend(ctx, t.ID)
			} else {
				err = p.m.Stop(ctx, t.ID)
			}
			if err != nil {
				p.logf("idle %s of machine %s: %v", mode, t.ID, err)
				p.mu.Lock()
				st.stopping = false
				p.mu.Unlock()
			}
		}()
	}
}

// autostop is the strictest idle action a machine's services ask for.
func autostop(t Target) string {
	mode := "off"
	for _, svc := range t.Services {
		switch svc.Autostop {
		case "stop":
			mode = "stop"
		case "suspend":
			if mode == "off" {
				mode = "suspend"
			}
		}
	}
	return mode
}
