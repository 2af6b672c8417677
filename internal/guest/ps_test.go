package guest_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
)

// fakeGuest connects to a guest that acknowledges the sync, answers hello with hello,
// and hands every other stream to serve: a guest that may do anything.
func fakeGuest(t *testing.T, hello guest.Reply, serve func(h guest.Header, s net.Conn)) *guest.Client {
	t.Helper()
	hostEnd, guestEnd := net.Pipe()
	go func() {
		buf := make([]byte, len(guest.SyncMagic))
		io.ReadFull(guestEnd, buf)
		guestEnd.Write(guest.AckMagic)
		sess, err := yamux.Server(guestEnd, guest.SessionConfig())
		if err != nil {
			return
		}
		defer sess.Close()
		for {
			s, err := sess.AcceptStream()
			if err != nil {
				return
			}
			go func() {
				defer s.Close()
				var h guest.Header
				if guest.ReadFrame(s, &h) != nil {
					return
				}
				if h.Op == guest.OpHello {
					guest.WriteFrame(s, hello)
					return
				}
				serve(h, s)
			}()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := guest.Connect(ctx, hostEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

var psHello = guest.Reply{Version: guest.Version, Ops: []guest.Op{guest.OpPs}}

// A guest that claims a billion processes, each with a command, directory and socket
// list far over the bounds, gets entries held to the bounds, and no more of them than
// the host's 2 MiB of kept text: the host stops reading there.
func TestPsHoldsHostileGuestToBounds(t *testing.T) {
	sockets := make([]guest.Socket, 40)
	for i := range sockets {
		sockets[i] = guest.Socket{Proto: strings.Repeat("p", 100), Address: strings.Repeat("a", 100)}
	}
	huge := guest.ProcessStat{PID: 7, Command: strings.Repeat("c", 2*guest.MaxProcString) + "é", Dir: strings.Repeat("d", 3*guest.MaxProcString), Listen: sockets}
	var sent atomic.Int64
	c := fakeGuest(t, psHello, func(h guest.Header, s net.Conn) {
		guest.WriteFrame(s, guest.Reply{Count: 1 << 30})
		for guest.WriteFrame(s, huge) == nil {
			sent.Add(1)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	procs, err := c.Ps(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Entries this large fill the text the host keeps (2 MiB) long before MaxProcs.
	if len(procs) == 0 || len(procs) >= guest.MaxProcs {
		t.Fatalf("%d entries; want fewer than the cap, %d, for entries this large", len(procs), guest.MaxProcs)
	}
	kept := 0
	for _, p := range procs {
		kept += len(p.Command) + len(p.Dir)
		for _, s := range p.Listen {
			kept += len(s.Proto) + len(s.Address)
		}
	}
	if kept > 2<<20 {
		t.Errorf("kept %d bytes of text, over 2 MiB", kept)
	}
	for _, p := range procs {
		if len(p.Command) > guest.MaxProcString || len(p.Dir) > guest.MaxProcString || len(p.Listen) > guest.MaxProcSockets {
			t.Fatalf("entry over the bounds: command %d, dir %d bytes, %d sockets", len(p.Command), len(p.Dir), len(p.Listen))
		}
		for _, s := range p.Listen {
			if len(s.Proto)+len(s.Address) > 72 {
				t.Fatalf("socket of %d+%d bytes kept", len(s.Proto), len(s.Address))
			}
		}
	}
	// Past the cap the host reads nothing more: the guest's writes stop once they fill
	// the stream's flow-control window (256 KiB), whenever this is looked at.
	frame, _ := json.Marshal(huge)
	if n := sent.Load(); n > guest.MaxProcs+int64(256<<10/len(frame))+2 {
		t.Errorf("the guest wrote %d frames; the host read on past the cap", n)
	}
}

// A guest whose answer runs past the byte bound (frames near the frame cap each) is cut
// off with a protocol error rather than read for ever.
func TestPsRefusesOversizedAnswer(t *testing.T) {
	big := guest.ProcessStat{Command: strings.Repeat("x", 1000_000)}
	c := fakeGuest(t, psHello, func(h guest.Header, s net.Conn) {
		guest.WriteFrame(s, guest.Reply{Count: guest.MaxProcs})
		for guest.WriteFrame(s, big) == nil {
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err := c.Ps(ctx)
	if !errors.Is(err, errdefs.ErrProtocol) || !strings.Contains(err.Error(), "bytes") {
		t.Fatalf("err = %v; want a protocol error naming the byte bound", err)
	}
}

// A guest agent from before ps (its hello lists no added operations) is not asked: the
// caller learns to restart the machine instead of reading "unknown operation".
func TestPsOldAgent(t *testing.T) {
	asked := make(chan guest.Op, 1)
	c := fakeGuest(t, guest.Reply{Version: guest.Version}, func(h guest.Header, s net.Conn) { asked <- h.Op })
	_, err := c.Ps(context.Background())
	if !errors.Is(err, errdefs.ErrProtocol) || !strings.Contains(err.Error(), "restart") {
		t.Fatalf("err = %v; want a protocol error saying to restart", err)
	}
	select {
	case op := <-asked:
		t.Errorf("the old agent was sent %q", op)
	default:
	}
}
