package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/machine"
)

// fakeMachines runs each "machine" as an HTTP server on 127.0.0.1 that says its ID.
type fakeMachines struct {
	mu       sync.Mutex
	ts       map[string]*Target
	servers  map[string]*http.Server
	starts   map[string]int
	stops    map[string]string
	slowWake time.Duration
}

func newFake() *fakeMachines {
	return &fakeMachines{ts: map[string]*Target{}, servers: map[string]*http.Server{}, starts: map[string]int{}, stops: map[string]string{}}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (f *fakeMachines) add(t *testing.T, id, app string, state machine.State, svc api.Service) {
	svc.InternalPort = freePort(t)
	f.mu.Lock()
	f.ts[id] = &Target{ID: id, App: app, State: state, Addr: netip.MustParseAddr("127.0.0.1"), Services: []api.Service{svc}}
	f.mu.Unlock()
	if state == machine.Started {
		f.serve(id)
	}
	t.Cleanup(func() { f.Stop(context.Background(), id) })
}

func (f *fakeMachines) serve(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := f.ts[id]
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", t.Services[0].InternalPort))
	if err != nil {
		panic(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			time.Sleep(300 * time.Millisecond)
		}
		fmt.Fprintf(w, "%s host=%s", id, r.Host)
	})}
	go srv.Serve(ln)
	f.servers[id] = srv
	t.State = machine.Started
}

func (f *fakeMachines) Targets(context.Context) ([]Target, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []Target
	for _, t := range f.ts {
		out = append(out, *t)
	}
	return out, nil
}

func (f *fakeMachines) Start(ctx context.Context, id string) error {
	f.mu.Lock()
	f.starts[id]++
	f.mu.Unlock()
	time.Sleep(f.slowWake)
	f.serve(id)
	return nil
}

func (f *fakeMachines) halt(id string, to machine.State) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s := f.servers[id]; s != nil {
		s.Close()
		delete(f.servers, id)
	}
	if t := f.ts[id]; t != nil {
		t.State = to
	}
	f.stops[id] = string(to)
}

func (f *fakeMachines) Stop(_ context.Context, id string) error {
	f.halt(id, machine.Stopped)
	return nil
}
func (f *fakeMachines) Suspend(_ context.Context, id string) error {
	f.halt(id, machine.Suspended)
	return nil
}

func startProxy(t *testing.T, f *fakeMachines, idle time.Duration) *Proxy {
	return startProxyWith(t, f, Config{IdleTimeout: idle})
}

// startProxyWith starts a proxy with cfg, filling in the test's address, wake timeout
// and refresh.
func startProxyWith(t *testing.T, f *fakeMachines, cfg Config) *Proxy {
	cfg.HTTPAddr, cfg.WakeTimeout, cfg.Refresh = "127.0.0.1:0", 10*time.Second, 20*time.Millisecond
	p := New(f, cfg)
	if err := p.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go p.Run(ctx)
	t.Cleanup(cancel)
	time.Sleep(50 * time.Millisecond)
	return p
}

func get(t *testing.T, p *Proxy, host, path string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+p.Addr()+path, nil)
	req.Host = host
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func web(autostop string) api.Service {
	on := true
	return api.Service{Protocol: "tcp", Ports: []api.ServicePort{{Port: 80, Handlers: []string{"http"}}}, Autostop: api.Autostop(autostop), Autostart: &on}
}

func TestRoutesByHostAndHidesOtherApps(t *testing.T) {
	f := newFake()
	f.add(t, "w1", "web", machine.Started, web("off"))
	f.add(t, "b1", "blog", machine.Started, web("off"))
	p := startProxy(t, f, time.Hour)
	if code, body := get(t, p, "web.kiln.internal", "/"); code != 200 || !strings.HasPrefix(body, "w1 host=web.kiln.internal") {
		t.Fatalf("web: %d %q", code, body)
	}
	if code, body := get(t, p, "blog.kiln.internal:8080", "/"); code != 200 || !strings.HasPrefix(body, "b1") {
		t.Fatalf("blog: %d %q", code, body)
	}
	// An unknown app and a host outside the domain get the same 404, naming no app.
	_, a := get(t, p, "nope.kiln.internal", "/")
	code, b := get(t, p, "example.com", "/")
	if code != 404 || a != b || strings.Contains(a, "web") || strings.Contains(a, "blog") {
		t.Fatalf("unknown hosts: %d %q vs %q", code, a, b)
	}
}

func TestWakesASleepingMachineAndHoldsTheRequest(t *testing.T) {
	f := newFake()
	f.slowWake = 400 * time.Millisecond
	f.add(t, "w1", "web", machine.Suspended, web("suspend"))
	p := startProxy(t, f, time.Hour)
	var wg sync.WaitGroup
	for i := 0; i < 5; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if code, body := get(t, p, "web.kiln.internal", "/"); code != 200 || !strings.HasPrefix(body, "w1") {
				t.Errorf("request during wake: %d %q", code, body)
			}
		}()
	}
	wg.Wait()
	if f.starts["w1"] != 1 {
		t.Fatalf("started %d times for 5 concurrent requests, want once", f.starts["w1"])
	}
}

func TestIdleMachinesStopKeepingMinRunning(t *testing.T) {
	f := newFake()
	svc := web("suspend")
	svc.MinMachinesRunning = 1
	f.add(t, "w1", "web", machine.Started, svc)
	f.add(t, "w2", "web", machine.Started, svc)
	keep := web("off")
	f.add(t, "k1", "keep", machine.Started, keep)
	startProxy(t, f, 300*time.Millisecond)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		f.mu.Lock()
		n := len(f.stops)
		f.mu.Unlock()
		if n > 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // room for a wrong second stop
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.stops) != 1 || (f.stops["w1"] != "suspended" && f.stops["w2"] != "suspended") {
		t.Fatalf("idle actions: %v; want exactly one of w1, w2 suspended (min_machines_running 1) and k1 left alone", f.stops)
	}
}

func TestLeastLoadedAndHealthChecks(t *testing.T) {
	f := newFake()
	svc := web("off")
	svc.Concurrency = &api.Concurrency{Type: "requests", SoftLimit: 1, HardLimit: 5}
	f.add(t, "w1", "web", machine.Started, svc)
	f.add(t, "w2", "web", machine.Started, svc)
	p := startProxy(t, f, time.Hour)
	// Two slow requests at once land on different machines.
	got := make(chan string, 2)
	for i := 0; i < 2; i++ {
		go func() { _, b := get(t, p, "web.kiln.internal", "/slow"); got <- b[:2] }()
	}
	a, b := <-got, <-got
	if a == b {
		t.Fatalf("both concurrent requests went to %s", a)
	}
	// w2's check fails (nothing listens there any more): it gets no traffic.
	f.mu.Lock()
	f.ts["w2"].Services[0].Checks = []api.Check{{Type: "tcp", Interval: "50ms", Timeout: "200ms"}}
	f.ts["w1"].Services[0].Checks = []api.Check{{Type: "tcp", Interval: "50ms", Timeout: "200ms"}}
	f.servers["w2"].Close()
	f.mu.Unlock()
	time.Sleep(400 * time.Millisecond)
	for i := 0; i < 6; i++ {
		if code, body := get(t, p, "web.kiln.internal", "/"); code != 200 || !strings.HasPrefix(body, "w1") {
			t.Fatalf("request %d with w2 failing its check: %d %q", i, code, body)
		}
	}
}

func TestRawTCPPort(t *testing.T) {
	f := newFake()
	port := freePort(t)
	f.add(t, "t1", "db", machine.Stopped, api.Service{Protocol: "tcp", Ports: []api.ServicePort{{Port: port}}, Autostop: "stop"})
	f.ts["t1"].Services[0].Autostart = func() *bool { b := true; return &b }()
	startProxy(t, f, time.Hour)
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.HasPrefix(string(b), "t1") {
		t.Fatalf("raw TCP through port %d: %q", port, b)
	}
}

// A cordoned machine takes no request, is not woken, and still has its checks run: a
// deploy reads its health before letting traffic in.
func TestCordonedMachineGetsNoTrafficButIsChecked(t *testing.T) {
	f := newFake()
	svc := web("off")
	svc.Checks = []api.Check{{Type: "http", Interval: "50ms", Timeout: "200ms"}}
	f.add(t, "w1", "web", machine.Started, svc)
	f.add(t, "w2", "web", machine.Started, svc)
	f.mu.Lock()
	f.ts["w2"].Cordoned = true
	f.mu.Unlock()
	p := startProxy(t, f, time.Hour)
	for i := 0; i < 6; i++ {
		if code, body := get(t, p, "web.kiln.internal", "/"); code != 200 || !strings.HasPrefix(body, "w1") {
			t.Fatalf("request %d with w2 cordoned: %d %q", i, code, body)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for h := p.Health("w2"); h.Rounds == 0 || !h.Passing || !h.Cordoned; h = p.Health("w2") {
		if time.Now().After(deadline) {
			t.Fatalf("the cordoned machine's checks never passed: %+v", h)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Both cordoned, w1 stopped: a request is held, and nothing is woken.
	f.mu.Lock()
	f.ts["w1"].Cordoned = true
	f.mu.Unlock()
	f.Stop(context.Background(), "w1")
	time.Sleep(100 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+p.Addr()+"/", nil)
	req.Host = "web.kiln.internal"
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatalf("a request with every machine cordoned was answered: %s", resp.Status)
	}
	f.mu.Lock()
	woken := f.starts["w1"]
	f.mu.Unlock()
	if woken != 0 {
		t.Fatalf("a cordoned machine was woken %d times", woken)
	}
	if h := p.Health("w1"); !h.StartedAt.IsZero() || h.Rounds != 0 {
		t.Fatalf("a stopped machine's health kept its old rounds: %+v", h)
	}
}

// A machine that just started is checked again soon until it first passes, whatever
// its interval: a deploy waits on that first pass.
func TestChecksRetrySoonAfterStart(t *testing.T) {
	f := newFake()
	svc := web("off")
	svc.Checks = []api.Check{{Type: "http", Interval: "30s", Timeout: "200ms"}}
	f.add(t, "w1", "web", machine.Stopped, svc)
	f.mu.Lock()
	f.ts["w1"].State = machine.Started // started, its server not yet listening
	f.mu.Unlock()
	p := startProxy(t, f, time.Hour)
	deadline := time.Now().Add(5 * time.Second)
	for h := p.Health("w1"); h.Rounds == 0; h = p.Health("w1") {
		if time.Now().After(deadline) {
			t.Fatal("no check round ran")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if h := p.Health("w1"); h.Passing {
		t.Fatalf("passing before anything listened: %+v", h)
	}
	f.serve("w1")
	served := time.Now()
	for h := p.Health("w1"); !h.Passing; h = p.Health("w1") {
		if time.Since(served) > 3*time.Second {
			t.Fatalf("the check was not run again within 3 s of the machine listening (interval 30s): %+v", h)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
