package machines

import (
	"context"
	"sync"
	"time"

	"github.com/kilnhq/kiln/internal/guest"
)

// A scrape asks every running machine's agent for its stats (guest.OpStats), at most
// guestStatsParallel at once. It waits, for at most guestStatsWait in all, only for the
// guests that answered their last request: a guest that did not (slow, silent or
// hostile) is asked again in the background, and served with its last answer or none,
// so that it cannot hold up /metrics for everyone. A request holds its slot for at most
// guestStatsTimeout, whatever the guest does with its stream.
const (
	guestStatsWait     = 250 * time.Millisecond
	guestStatsTimeout  = 2 * time.Second
	guestStatsParallel = 16
)

// guestStatsSource is how a running machine is asked: its agent's client, or a fake.
type guestStatsSource interface {
	Stats(ctx context.Context) (guest.Stats, error)
}

// guestStats holds each running machine's last stats. The zero value is ready.
type guestStats struct {
	mu   sync.Mutex
	last map[string]guest.Stats
	// asking marks machines whose request is under way: a guest that does not answer
	// is not asked again on top of it, so a scrape a second piles up nothing.
	asking map[string]bool
	// slow marks machines whose last request failed or is still under way: scrapes do
	// not wait for them.
	slow  map[string]bool
	slots chan struct{}
	// timeout bounds a request's wait for a slot, and then the request itself;
	// zero is guestStatsTimeout.
	timeout time.Duration
}

// read asks each source, in parallel, and returns what each answered or answered last;
// machines not in sources are forgotten.
func (g *guestStats) read(ctx context.Context, sources map[string]guestStatsSource) map[string]guest.Stats {
	g.mu.Lock()
	if g.last == nil {
		g.last, g.asking, g.slow = map[string]guest.Stats{}, map[string]bool{}, map[string]bool{}
		g.slots = make(chan struct{}, guestStatsParallel)
	}
	for id := range g.slow {
		if sources[id] == nil {
			delete(g.slow, id)
		}
	}
	for id := range g.last {
		if sources[id] == nil {
			delete(g.last, id)
		}
	}
	var waits []chan struct{}
	for id, src := range sources {
		if g.asking[id] {
			continue
		}
		g.asking[id] = true
		done := make(chan struct{})
		if !g.slow[id] {
			waits = append(waits, done)
		}
		go func() {
			defer close(done)
			st, err := g.ask(src)
			g.mu.Lock()
			defer g.mu.Unlock()
			delete(g.asking, id)
			g.slow[id] = err != nil
			if err == nil {
				g.last[id] = st
			}
		}()
	}
	g.mu.Unlock()
	deadline := time.NewTimer(guestStatsWait)
	defer deadline.Stop()
wait:
	for _, done := range waits {
		select {
		case <-done:
		case <-deadline.C:
			break wait
		case <-ctx.Done():
			break wait
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make(map[string]guest.Stats, len(sources))
	for id := range sources {
		if st, ok := g.last[id]; ok {
			out[id] = st
		}
		if g.asking[id] {
			g.slow[id] = true // it did not answer in time: the next scrapes do not wait for it
		}
	}
	return out
}

// ask asks src once a slot is free. The slot is given back after guestStatsTimeout even
// if src has not returned (a guest's stream that blocks a write ignores the context);
// the call itself is waited for, so the machine is not asked again meanwhile.
func (g *guestStats) ask(src guestStatsSource) (guest.Stats, error) {
	timeout := g.timeout
	if timeout == 0 {
		timeout = guestStatsTimeout
	}
	wait := time.NewTimer(timeout)
	defer wait.Stop()
	select {
	case g.slots <- struct{}{}:
	case <-wait.C:
		return guest.Stats{}, context.DeadlineExceeded
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	type answer struct {
		st  guest.Stats
		err error
	}
	res := make(chan answer, 1)
	go func() {
		st, err := src.Stats(ctx)
		res <- answer{st, err}
	}()
	select {
	case a := <-res:
		<-g.slots
		return a.st, a.err
	case <-ctx.Done():
		<-g.slots
		a := <-res
		if a.err == nil {
			a.err = ctx.Err()
		}
		return a.st, a.err
	}
}
