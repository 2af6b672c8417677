package proxy

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/machine"
)

func duration(s string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(s); err == nil && d > 0 {
		return d
	}
	return def
}

// A machine's checks run every startupInterval from its start until they first pass,
// for at most startupWindow; then at the configured interval.
const (
	startupInterval = 200 * time.Millisecond
	startupWindow   = 60 * time.Second
)

// check runs the health checks of started machines that are due; a machine is failing
// while its latest round has a failure and its grace period is over.
func (p *Proxy) check(ctx context.Context) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	for _, t := range p.targets {
		s := p.stat(t.ID)
		if t.State != machine.Started || s.checking || s.startedAt.IsZero() {
			continue
		}
		var due []checkRun
		for _, svc := range t.Services {
			for _, c := range svc.Checks {
				due = append(due, checkRun{t: t, svc: svc, c: c})
			}
		}
		if len(due) == 0 {
			continue
		}
		interval := duration(due[0].c.Interval, 15*time.Second)
		if !s.passed && now.Sub(s.startedAt) < startupWindow {
			// Until it first passes on this run, a machine that just started is asked
			// again soon: a deploy or a woken request waits on that first pass, and the
			// interval is for watching a machine that is up.
			interval = min(interval, startupInterval)
		}
		if now.Sub(s.lastCheck) < interval {
			continue
		}
		s.checking, s.lastCheck = true, now
		go func() {
			var failed error
			for _, d := range due {
				if err := d.run(ctx); err != nil {
					failed = err
					break
				}
			}
			p.mu.Lock()
			defer p.mu.Unlock()
			s.checking = false
			if !s.startedAt.IsZero() { // still the same run of the machine
				s.rounds++
				s.passed = failed == nil
			}
			grace := duration(due[0].c.GracePeriod, 0)
			was := s.failing
			s.failing = failed != nil && time.Since(s.startedAt) >= grace
			if s.failing != was {
				if s.failing {
					p.logf("machine %s of app %s fails its health check: %v; it gets no traffic", t.ID, t.App, failed)
				} else {
					p.logf("machine %s of app %s passes its health checks again", t.ID, t.App)
				}
				p.broadcast()
			}
		}()
	}
}

// checkClient asks the machine itself: no proxy from the environment, no redirects
// (a guest could otherwise point the host at another address).
var checkClient = &http.Client{
	Transport:     &http.Transport{Proxy: nil, DisableKeepAlives: true},
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

type checkRun struct {
	t   Target
	svc api.Service
	c   api.Check
}

func (d checkRun) run(ctx context.Context) error {
	timeout := duration(d.c.Timeout, 2*time.Second)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	addr := net.JoinHostPort(d.t.Addr.String(), strconv.Itoa(d.svc.InternalPort))
	if d.c.Type == "http" {
		path := d.c.Path
		if path == "" {
			path = "/"
		}
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+path, nil)
		resp, err := checkClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode >= 400 {
			return fmt.Errorf("GET %s answered %s", path, resp.Status)
		}
		return nil
	}
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	return c.Close()
}

// Health is what the proxy knows of a machine's checks: how many rounds ran since it was
// last seen started, whether the latest passed, and the requests it is serving.
type Health struct {
	// StartedAt is when the proxy first saw the machine's current run started; zero
	// when it is not started (or the proxy does not know it).
	StartedAt time.Time
	Rounds    int
	Passing   bool
	Inflight  int
	// Cordoned says the proxy's table has the machine out of service.
	Cordoned bool
	// Known says the proxy routes to the machine (it has services and an address).
	Known bool
}

// Health reports a machine's checks as the proxy last ran them.
func (p *Proxy) Health(id string) Health {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.stats[id]
	if !ok {
		return Health{}
	}
	h := Health{StartedAt: s.startedAt, Rounds: s.rounds, Passing: s.passed, Inflight: s.inflight}
	for _, t := range p.targets {
		if t.ID == id {
			h.Cordoned, h.Known = t.Cordoned, true
		}
	}
	return h
}
