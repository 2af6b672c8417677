package machines

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/guest"
)

// fakeStats answers with its stats until hang is set, then never (ignoring ctx, as a
// hostile guest's stream might), counting the calls.
type fakeStats struct {
	st      guest.Stats
	err     error
	hang    atomic.Bool
	calls   atomic.Int32
	release chan struct{}
}

func (f *fakeStats) Stats(ctx context.Context) (guest.Stats, error) {
	f.calls.Add(1)
	if f.hang.Load() {
		<-f.release
		return guest.Stats{}, errors.New("released")
	}
	return f.st, f.err
}

// A scrape serves each guest's answer; a guest that stops answering holds it up no
// longer than guestStatsWait and is served with its last answer, is not asked again while
// its request is under way, and is forgotten once it no longer runs.
func TestGuestStatsServeLastAnswerOfSlowGuest(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	slow := &fakeStats{st: guest.Stats{MemAvailable: 1}, release: release}
	fast := &fakeStats{st: guest.Stats{MemAvailable: 2}, release: release}
	failing := &fakeStats{err: errors.New("no"), release: release}
	var g guestStats
	sources := map[string]guestStatsSource{"slow": slow, "fast": fast, "failing": failing}
	got := g.read(context.Background(), sources)
	if got["slow"].MemAvailable != 1 || got["fast"].MemAvailable != 2 || len(got) != 2 {
		t.Fatalf("first scrape: %+v; want slow's and fast's answers, none for failing", got)
	}

	slow.hang.Store(true)
	fast.st.MemAvailable = 3
	for i := range 2 {
		start := time.Now()
		got = g.read(context.Background(), sources)
		if d := time.Since(start); d > guestStatsWait+time.Second {
			t.Errorf("scrape %d took %s with a guest that does not answer; want about %s", i, d, guestStatsWait)
		}
		if got["slow"].MemAvailable != 1 || got["fast"].MemAvailable != 3 {
			t.Fatalf("scrape %d: %+v; want slow's last answer and fast's new one", i, got)
		}
	}
	if n := slow.calls.Load(); n != 2 {
		t.Errorf("the silent guest was asked %d times; want 2 (not again while its request is under way)", n)
	}

	delete(sources, "fast")
	g.read(context.Background(), sources)
	g.mu.Lock()
	_, kept := g.last["fast"]
	g.mu.Unlock()
	if kept {
		t.Error("a machine no longer running keeps its stats")
	}
}
