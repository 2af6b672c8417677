package machines

import (
	"context"
	"sync"
	"time"

	"github.com/kilnhq/kiln/internal/guest"
)

// A scrape asks every running machine's agent for its stats (guest.OpStats) but waits for
// none longer than guestStatsWait, asking at most guestStatsParallel at once: a slow or
// hostile guest must not hold up /metrics. A guest that does not answer in time is
// served with its last answer, or with none.
const (
	guestStatsWait     = 250 * time.Millisecond
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
	slots  chan struct{}
}

// read asks each source, in parallel, for at most guestStatsWait in all, and returns
// what each answered or answered last; machines not in sources are forgotten.
func (g *guestStats) read(ctx context.Context, sources map[string]guestStatsSource) map[string]guest.Stats {
	g.mu.Lock()
	if g.last == nil {
		g.last, g.asking, g.slots = map[string]guest.Stats{}, map[string]bool{}, make(chan struct{}, guestStatsParallel)
	}
	for id := range g.last {
		if sources[id] == nil {
			delete(g.last, id)
		}
	}
	g.mu.Unlock()
	if len(sources) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), guestStatsWait)
	defer cancel()
	var wg sync.WaitGroup
	for id, src := range sources {
		g.mu.Lock()
		busy := g.asking[id]
		g.asking[id] = true
		g.mu.Unlock()
		if busy {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := g.ask(ctx, src)
			g.mu.Lock()
			defer g.mu.Unlock()
			delete(g.asking, id)
			if err == nil {
				g.last[id] = st
			}
		}()
	}
	// Every request ends by ctx's deadline (the client closes its stream then); this
	// does not count on it.
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make(map[string]guest.Stats, len(sources))
	for id := range sources {
		if st, ok := g.last[id]; ok {
			out[id] = st
		}
	}
	return out
}

// ask asks src once a slot is free, unless ctx ends first.
func (g *guestStats) ask(ctx context.Context, src guestStatsSource) (guest.Stats, error) {
	select {
	case g.slots <- struct{}{}:
	case <-ctx.Done():
		return guest.Stats{}, ctx.Err()
	}
	defer func() { <-g.slots }()
	return src.Stats(ctx)
}
