package agent_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/guest/agent"
)

// connect serves an agent (running processes on this host) over an in-memory pipe and
// returns a client for it.
func connect(t *testing.T) *guest.Client { return connectWith(t, nil) }

// connectWith is connect with an agent that setup, if not nil, configures first.
func connectWith(t *testing.T, setup func(*agent.Agent)) *guest.Client {
	t.Helper()
	hostEnd, guestEnd := net.Pipe()
	a := agent.New(agent.ExecStarter{})
	if setup != nil {
		setup(a)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.ServeLink(ctx, guestEnd, false)
	}()
	c, err := guest.Connect(ctx, hostEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		cancel()
		guestEnd.Close()
		<-done
	})
	return c
}

func exec(t *testing.T, c *guest.Client, req guest.ExecRequest, stdin io.Reader) (string, string, guest.ExitStatus, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	st, err := c.Exec(ctx, req, guest.IO{Stdin: stdin, Stdout: &out, Stderr: &errb})
	return out.String(), errb.String(), st, err
}

func sh(s string) guest.ExecRequest { return guest.ExecRequest{Argv: []string{"sh", "-c", s}} }

func TestExec(t *testing.T) {
	c := connect(t)
	for _, tc := range []struct {
		name      string
		req       guest.ExecRequest
		stdin     string
		out, errs string
		code, sig int
	}{
		{"ExitCode", sh("echo hi; exit 3"), "", "hi\n", "", 3, 0},
		{"Stderr", sh("echo a; echo b >&2"), "", "a\n", "b\n", 0, 0},
		{"Signal", sh("kill -TERM $$"), "", "", "", 128 + 15, 15},
		{"Stdin", guest.ExecRequest{Argv: []string{"tr", "a-z", "A-Z"}}, "kiln", "KILN", "", 0, 0},
		{"Env", guest.ExecRequest{Argv: []string{"sh", "-c", "echo $A$B"}, Env: []string{"A=1", "B=2"}}, "", "12\n", "", 0, 0},
		{"Dir", guest.ExecRequest{Argv: []string{"pwd"}, Dir: "/"}, "", "/\n", "", 0, 0},
		{"BackgroundChildHoldsPipe", sh("sleep 30 & echo started"), "", "started\n", "", 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var in io.Reader
			if tc.stdin != "" {
				in = strings.NewReader(tc.stdin)
			}
			out, errs, st, err := exec(t, c, tc.req, in)
			if err != nil {
				t.Fatal(err)
			}
			if out != tc.out || errs != tc.errs || st.Code != tc.code || st.Signal != tc.sig {
				t.Errorf("got out %q err %q status %+v; want out %q err %q code %d signal %d", out, errs, st, tc.out, tc.errs, tc.code, tc.sig)
			}
		})
	}
}

func TestExecErrors(t *testing.T) {
	c := connect(t)
	_, _, _, err := exec(t, c, guest.ExecRequest{Argv: []string{"kiln-no-such-binary"}}, nil)
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "kiln-no-such-binary") {
		t.Errorf("missing command: %v", err)
	}
	_, _, _, err = exec(t, c, guest.ExecRequest{Argv: []string{"true"}, Dir: "/nonexistent-dir"}, nil)
	if err == nil || !strings.Contains(err.Error(), "nonexistent-dir") {
		t.Errorf("missing workdir: %v", err)
	}
	_, _, _, err = exec(t, c, guest.ExecRequest{}, nil)
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("empty argv: %v", err)
	}
	req := sh("sleep 10")
	req.TimeoutMS = 100
	_, _, st, err := exec(t, c, req, nil)
	if err != nil || !st.TimedOut || st.Signal != int(syscall.SIGKILL) {
		t.Errorf("timeout: %+v %v", st, err)
	}
}

// blockingWriter accepts nothing until released.
type blockingWriter struct {
	release chan struct{}
	n       int64
	mu      sync.Mutex
}

func (w *blockingWriter) Write(p []byte) (int, error) {
	<-w.release
	w.mu.Lock()
	w.n += int64(len(p))
	w.mu.Unlock()
	return len(p), nil
}

// A reader that does not read must stall the writer in the guest, not fill memory.
func TestBackpressure(t *testing.T) {
	c := connect(t)
	w := &blockingWriter{release: make(chan struct{})}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const size = 64 << 20
	p, err := c.Start(ctx, sh(fmt.Sprintf("head -c %d /dev/zero", size)), guest.IO{Stdout: w})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	// head is still blocked in write(2): the bytes in flight are bounded by the pipe,
	// one copy buffer and the stream window, far below 64 MiB.
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", p.PID)); err != nil {
		t.Fatalf("the writer finished while nobody read its output: no backpressure")
	}
	close(w.release)
	st, err := p.Wait(ctx)
	if err != nil || st.Code != 0 || w.n != size {
		t.Errorf("after release: %+v %v, %d bytes, want %d", st, err, w.n, size)
	}
}

func TestConcurrentExecsOneConnection(t *testing.T) {
	c := connect(t)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, _, st, err := exec(t, c, sh(fmt.Sprintf("sleep 0.3; seq %d", 1000+i)), nil)
			if err != nil || st.Code != 0 || strings.Count(out, "\n") != 1000+i {
				t.Errorf("exec %d: %v %+v, %d lines", i, err, st, strings.Count(out, "\n"))
			}
		}()
	}
	wg.Wait()
}

func TestFiles(t *testing.T) {
	c := connect(t)
	ctx := context.Background()
	p := t.TempDir() + "/sub/f"
	if err := c.WriteFile(ctx, p, 0o640, strings.NewReader("content")); err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if _, err := c.ReadFile(ctx, p, &b); err != nil || b.String() != "content" {
		t.Errorf("read back %q %v", b.String(), err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o640 {
		t.Errorf("mode %v", fi.Mode())
	}
	if err := c.WriteFile(ctx, "relative", 0, strings.NewReader("")); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("relative path: %v", err)
	}
}

// Connect reaches a Unix socket in the guest and carries bytes both ways; a socket that
// is not there is a not-found error.
func TestConnect(t *testing.T) {
	c := connect(t)
	ctx := context.Background()
	sock := filepath.Join(t.TempDir(), "d.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		io.Copy(conn, conn) // echo
		conn.Close()
	}()
	conn, err := c.Connect(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo: %q %v", buf, err)
	}
	conn.Close()
	if _, err := c.Connect(ctx, sock+".missing"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("missing socket: %v", err)
	}
}

// A guest from another release must be refused with a message saying what to do.
func TestVersionMismatch(t *testing.T) {
	hostEnd, guestEnd := net.Pipe()
	go func() {
		// A guest that acknowledges the sync but speaks protocol v99.
		buf := make([]byte, len(guest.SyncMagic))
		io.ReadFull(guestEnd, buf)
		guestEnd.Write(guest.AckMagic)
		sess, _ := yamux.Server(guestEnd, guest.SessionConfig())
		s, err := sess.AcceptStream()
		if err != nil {
			return
		}
		var h guest.Header
		guest.ReadFrame(s, &h)
		guest.WriteFrame(s, guest.Reply{Version: 99})
	}()
	_, err := guest.Connect(context.Background(), hostEnd)
	if !errors.Is(err, errdefs.ErrProtocol) || !strings.Contains(err.Error(), "v99") || !strings.Contains(err.Error(), "make setup") {
		t.Errorf("err = %v", err)
	}

	// And the guest refuses a host speaking another version.
	c := connect(t)
	_ = c
	hostEnd2, guestEnd2 := net.Pipe()
	go agent.New(agent.ExecStarter{}).ServeLink(context.Background(), guestEnd2, false)
	hostEnd2.Write(guest.SyncMagic)
	buf := make([]byte, len(guest.AckMagic))
	io.ReadFull(hostEnd2, buf)
	sess, _ := yamux.Client(hostEnd2, guest.SessionConfig())
	s, _ := sess.OpenStream()
	guest.WriteFrame(s, guest.Header{Version: 99, Op: guest.OpHello})
	var r guest.Reply
	guest.ReadFrame(s, &r)
	if r.Code != guest.CodeVersion || !strings.Contains(r.Error, "v99") {
		t.Errorf("guest answered %+v", r)
	}
	sess.Close()
}

// chunkReader returns its chunks one Read at a time, then blocks until closed.
type chunkPort struct {
	chunks [][]byte
	out    bytes.Buffer
	mu     sync.Mutex
	done   chan struct{}
}

func (p *chunkPort) Read(b []byte) (int, error) {
	p.mu.Lock()
	if len(p.chunks) == 0 {
		p.mu.Unlock()
		<-p.done
		return 0, io.EOF
	}
	c := p.chunks[0]
	p.chunks = p.chunks[1:]
	p.mu.Unlock()
	return copy(b, c), nil
}

func (p *chunkPort) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.Write(b)
}

// The sync sequence is found even when split across reads, and each one starts a new
// session acknowledged exactly once.
func TestLinkFindsSyncAcrossReads(t *testing.T) {
	m := guest.SyncMagic
	p := &chunkPort{done: make(chan struct{}), chunks: [][]byte{
		[]byte("garbage from a dead host"), m[:5], m[5:], []byte("junk"), append([]byte("x"), m[:20]...), m[20:],
	}}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- agent.New(agent.ExecStarter{}).ServeLink(ctx, p, false) }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		p.mu.Lock()
		n := bytes.Count(p.out.Bytes(), guest.AckMagic)
		p.mu.Unlock()
		if n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d acknowledgements, want 2", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	close(p.done)
	<-errc
}

func TestSupervisedOutlivesConnection(t *testing.T) {
	// One agent, two host connections over time, as across a kiln restart.
	a := agent.New(agent.ExecStarter{})
	dial := func() *guest.Client {
		hostEnd, guestEnd := net.Pipe()
		go a.ServeLink(context.Background(), guestEnd, false)
		c, err := guest.Connect(context.Background(), hostEnd)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c1 := dial()
	if _, err := c1.Spawn(ctx, "workload", sh("echo one; echo err >&2; read x < /dev/null; sleep 2; echo two; exit 7")); err != nil {
		t.Fatal(err)
	}
	if _, err := c1.Spawn(ctx, "workload", sh("true")); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("second spawn while running: %v", err)
	}
	var got []string
	var off int64
	last, err := c1.Follow(ctx, "workload", 0, false, func(r guest.Record) error {
		got = append(got, fmt.Sprintf("%d:%s", r.Stream, r.Data))
		off = r.Offset + int64(len(r.Data))
		return nil
	})
	if err != nil || !last.Running {
		t.Fatalf("first read: %+v %v", last, err)
	}
	c1.Close() // the host goes away; the workload does not

	c2 := dial()
	defer c2.Close()
	last, err = c2.Follow(ctx, "workload", off, true, func(r guest.Record) error {
		got = append(got, fmt.Sprintf("%d:%s", r.Stream, r.Data))
		return nil
	})
	if err != nil || last.Exit == nil || last.Exit.Code != 7 {
		t.Fatalf("follow to the end: %+v %v", last, err)
	}
	all := strings.Join(got, "")
	if !strings.Contains(all, "1:one\n") || !strings.Contains(all, "2:err\n") || !strings.HasSuffix(all, "1:two\n") || strings.Count(all, "one") != 1 {
		t.Errorf("output %q", all)
	}
	// After the end, spawning the same id again works (a restart).
	if _, err := c2.Spawn(ctx, "workload", sh("exit 0")); err != nil {
		t.Errorf("respawn: %v", err)
	}
	if _, err := c2.Spawn(ctx, "other", guest.ExecRequest{Argv: []string{"kiln-no-such"}}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("spawn of a missing command: %v", err)
	}
}

func TestSupervisedOutputIsBounded(t *testing.T) {
	c := connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Spawn(ctx, "w", sh(fmt.Sprintf("head -c %d /dev/zero", 3*agent.OutputCap))); err != nil {
		t.Fatal(err)
	}
	// Wait until the writer has finished (a read from past the end returns at once,
	// saying whether it still runs), then read everything that is left: only the newest
	// OutputCap bytes.
	for ctx.Err() == nil {
		end, err := c.Follow(ctx, "w", 1<<62, false, func(guest.Record) error { return nil })
		if err != nil {
			t.Fatal(err)
		}
		if end.Exit != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	var n int64
	var first guest.Record
	last, err := c.Follow(ctx, "w", 0, false, func(r guest.Record) error {
		if n == 0 {
			first = r
		}
		n += int64(len(r.Data))
		return nil
	})
	if err != nil || last.Exit == nil {
		t.Fatalf("read after the end: %+v %v", last, err)
	}
	if n > agent.OutputCap+64<<10 || !first.Dropped || first.Offset == 0 || last.Offset != 3*agent.OutputCap {
		t.Errorf("kept %d bytes from offset %d (dropped %v), end %d", n, first.Offset, first.Dropped, last.Offset)
	}
}
