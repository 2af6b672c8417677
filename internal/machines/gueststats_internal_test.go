package machines

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/guest"
)

// fakeStats answers with its stats until hang is set, then never (ignoring ctx, as a
// hostile guest's stream might), counting the calls.
type fakeStats struct {
	st      atomic.Pointer[guest.Stats]
	err     error
	hang    atomic.Bool
	calls   atomic.Int32
	release chan struct{}
}

func newFake(mem uint64, release chan struct{}) *fakeStats {
	f := &fakeStats{release: release}
	f.set(mem)
	return f
}

func (f *fakeStats) set(mem uint64) { f.st.Store(&guest.Stats{MemAvailable: mem}) }

func (f *fakeStats) Stats(ctx context.Context) (guest.Stats, error) {
	f.calls.Add(1)
	if f.hang.Load() {
		<-f.release
		return guest.Stats{}, errors.New("released")
	}
	return *f.st.Load(), f.err
}

// A scrape serves each guest's answer. A guest that stops answering holds up one scrape
// by at most guestStatsWait, and none after it: it is served with its last answer and
// not asked again while its request is under way. A machine no longer running is
// forgotten.
func TestGuestStatsServeLastAnswerOfSlowGuest(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	slow, fast := newFake(1, release), newFake(2, release)
	failing := newFake(0, release)
	failing.err = errors.New("no")
	var g guestStats
	sources := map[string]guestStatsSource{"slow": slow, "fast": fast, "failing": failing}
	got := g.read(context.Background(), sources)
	if got["slow"].MemAvailable != 1 || got["fast"].MemAvailable != 2 || len(got) != 2 {
		t.Fatalf("first scrape: %+v; want slow's and fast's answers, none for failing", got)
	}

	slow.hang.Store(true)
	fast.set(3)
	start := time.Now()
	got = g.read(context.Background(), sources)
	if d := time.Since(start); d > guestStatsWait+time.Second {
		t.Errorf("the scrape that found a guest silent took %s; want about %s", d, guestStatsWait)
	}
	if got["slow"].MemAvailable != 1 || got["fast"].MemAvailable != 3 {
		t.Fatalf("second scrape: %+v; want slow's last answer and fast's new one", got)
	}
	fast.set(4)
	start = time.Now()
	got = g.read(context.Background(), sources)
	if d := time.Since(start); d >= guestStatsWait {
		t.Errorf("a scrape waited %s for a guest already known silent", d)
	}
	if got["slow"].MemAvailable != 1 || got["fast"].MemAvailable != 4 {
		t.Fatalf("third scrape: %+v; want slow's last answer and fast's new one", got)
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

// Guests that never answer, however many, cannot keep the others from being read: a
// request gives its slot back after guestStatsTimeout.
func TestGuestStatsSilentGuestsFreeTheirSlots(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	sources := map[string]guestStatsSource{}
	for i := range 2 * guestStatsParallel {
		f := newFake(0, release)
		f.hang.Store(true)
		sources[fmt.Sprintf("silent%d", i)] = f
	}
	g := guestStats{timeout: 50 * time.Millisecond}
	g.read(context.Background(), sources) // the silent ones take every slot
	good := newFake(7, release)
	sources["good"] = good
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if got := g.read(context.Background(), sources); got["good"].MemAvailable == 7 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the answering guest was never read beside %d silent ones (asked %d times)", 2*guestStatsParallel, good.calls.Load())
}
