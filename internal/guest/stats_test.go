package guest_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
)

var statsHello = guest.Reply{Version: guest.Version, Ops: []guest.Op{guest.OpStats}}

// A guest that answers stats with 60 filesystems under long mount paths and negative
// load averages gets MaxMounts of them, paths cut, and the loads read as 0: each
// filesystem becomes series on /metrics.
func TestStatsHoldsHostileGuestToBounds(t *testing.T) {
	fs := make([]guest.Filesystem, 60)
	for i := range fs {
		fs[i] = guest.Filesystem{Mount: "/" + strings.Repeat("m", 2*guest.MaxMountPath), Blocks: 10}
	}
	c := fakeGuest(t, statsHello, func(h guest.Header, s net.Conn) {
		guest.WriteFrame(s, guest.Reply{})
		guest.WriteFrame(s, guest.Stats{MemAvailable: 5, Load: [3]float64{-1, 2, -3}, Filesystems: fs})
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.MemAvailable != 5 || st.Load != [3]float64{0, 2, 0} {
		t.Errorf("mem_available %d load %v; want 5 and [0 2 0]", st.MemAvailable, st.Load)
	}
	if len(st.Filesystems) != guest.MaxMounts {
		t.Fatalf("%d filesystems kept; want the cap, %d", len(st.Filesystems), guest.MaxMounts)
	}
	for _, f := range st.Filesystems {
		if len(f.Mount) > guest.MaxMountPath || !strings.HasPrefix(f.Mount, "/mmm") || f.Blocks != 10 {
			t.Fatalf("filesystem %.20q… of %d bytes, %d blocks; want a path cut to %d bytes", f.Mount, len(f.Mount), f.Blocks, guest.MaxMountPath)
		}
	}
}

// An answer over MaxStatsBytes is refused with a protocol error, not read on.
func TestStatsRefusesOversizedAnswer(t *testing.T) {
	fs := make([]guest.Filesystem, 2000)
	for i := range fs {
		fs[i] = guest.Filesystem{Mount: strings.Repeat("m", 200)}
	}
	c := fakeGuest(t, statsHello, func(h guest.Header, s net.Conn) {
		guest.WriteFrame(s, guest.Reply{})
		guest.WriteFrame(s, guest.Stats{Filesystems: fs})
	})
	_, err := c.Stats(context.Background())
	if !errors.Is(err, errdefs.ErrProtocol) || !strings.Contains(err.Error(), "bytes") {
		t.Fatalf("err = %v; want a protocol error naming the byte bound", err)
	}
}

// A guest that does not answer holds the caller only as long as its context.
func TestStatsSilentGuest(t *testing.T) {
	c := fakeGuest(t, statsHello, func(h guest.Header, s net.Conn) { io.Copy(io.Discard, s) })
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.Stats(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v; want the context's deadline", err)
	}
}

// An agent from before stats is not asked.
func TestStatsOldAgent(t *testing.T) {
	asked := make(chan guest.Op, 1)
	c := fakeGuest(t, psHello, func(h guest.Header, s net.Conn) { asked <- h.Op })
	if _, err := c.Stats(context.Background()); !errors.Is(err, errdefs.ErrProtocol) {
		t.Fatalf("err = %v; want a protocol error", err)
	}
	select {
	case op := <-asked:
		t.Errorf("the old agent was sent %q", op)
	default:
	}
}
