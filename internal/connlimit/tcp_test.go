package connlimit_test

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/connlimit/connlimittest"
)

func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// Past the cap a new connection is closed at once; closing one makes room again.
func TestCapRefusesNewConnections(t *testing.T) {
	capped := connlimit.Cap(listen(t), 2, "test", nil)
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := capped.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	addr := capped.Addr().String()
	a, b := connlimittest.Dial(t, addr), connlimittest.Dial(t, addr)
	first := <-accepted
	<-accepted
	over := connlimittest.Dial(t, addr)
	if !connlimittest.ClosedWithin(over, 5*time.Second) {
		t.Fatal("a third connection over a cap of 2 stayed open")
	}
	if connlimittest.ClosedWithin(a, 10*time.Millisecond) || connlimittest.ClosedWithin(b, 10*time.Millisecond) {
		t.Fatal("a connection within the cap was closed")
	}
	first.Close()
	connlimittest.Dial(t, addr)
	select {
	case <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("no connection accepted after one closed")
	}
	if n := capped.Open(); n != 2 {
		t.Fatalf("%d open, want 2", n)
	}
}

// pipeThrough runs Pipe between each accepted connection and a fresh one to backend.
func pipeThrough(t *testing.T, backend string, idle time.Duration) string {
	ln := listen(t)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			m, err := net.Dial("tcp", backend)
			if err != nil {
				c.Close()
				continue
			}
			go connlimit.Pipe(c, m, idle)
		}
	}()
	return ln.Addr().String()
}

func TestPipeClosesBothSidesWhenIdle(t *testing.T) {
	back := listen(t)
	backConn := make(chan net.Conn, 1)
	go func() {
		c, err := back.Accept()
		if err == nil {
			backConn <- c
		}
	}()
	front := connlimittest.Dial(t, pipeThrough(t, back.Addr().String(), 300*time.Millisecond))
	m := <-backConn
	defer m.Close()
	// Bytes that keep passing, one way only, keep it open past the idle time.
	var last time.Time
	for i := 0; i < 6; i++ {
		time.Sleep(100 * time.Millisecond) // traffic with gaps shorter than the idle time
		if _, err := front.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		m.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(m, make([]byte, 1)); err != nil {
			t.Fatalf("byte %d did not pass: %v", i, err)
		}
		last = time.Now()
	}
	if !connlimittest.ClosedWithin(front, 5*time.Second) || !connlimittest.ClosedWithin(m, 5*time.Second) {
		t.Fatal("an idle piped connection was still open after 5s (idle timeout 300ms)")
	}
	if d := time.Since(last); d < 250*time.Millisecond {
		t.Fatalf("closed %s after the last byte, before the idle timeout", d)
	}
}

// A half-close passes through and the other direction goes on.
func TestPipeHalfClose(t *testing.T) {
	back := listen(t)
	go func() {
		c, err := back.Accept()
		if err != nil {
			return
		}
		b, _ := io.ReadAll(c)
		c.Write(append([]byte("got "), b...))
		c.Close()
	}()
	front := connlimittest.Dial(t, pipeThrough(t, back.Addr().String(), time.Minute))
	front.Write([]byte("hello"))
	front.(*net.TCPConn).CloseWrite()
	front.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(front)
	if err != nil || string(b) != "got hello" {
		t.Fatalf("%q %v", b, err)
	}
}
