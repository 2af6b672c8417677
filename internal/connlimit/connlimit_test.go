package connlimit_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/connlimit/connlimittest"
)

const childEnv = "CONNLIMIT_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		serveChild()
		return
	}
	os.Exit(m.Run())
}

// serve runs an HTTP server with lim whose handler trusts requests that carry
// "Authorization: ok".
func serve(t *testing.T, lim connlimit.HTTP) (string, *connlimit.Pending) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, pl := connlimit.NewServer(ln, handler(), lim)
	go srv.Serve(pl)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String(), pl
}

func handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") == "ok" {
			connlimit.Trust(r.Context())
		}
		io.WriteString(w, "ok")
	})
}

// get sends one request on c and returns the body.
func get(t *testing.T, c net.Conn, br *bufio.Reader, auth string) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\n\r\n", auth)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("request on a kept-alive connection: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func TestHeaderTimeoutClosesSlowClient(t *testing.T) {
	addr, _ := serve(t, connlimit.HTTP{HeaderTimeout: 200 * time.Millisecond})
	c := connlimittest.HalfOpen(t, addr)
	start := time.Now()
	if !connlimittest.ClosedWithin(c, 5*time.Second) {
		t.Fatal("a connection that never finished its headers was still open after 5s (header timeout 200ms)")
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Fatalf("closed after %s, before the header timeout", d)
	}
}

func TestHeaderSizeCap(t *testing.T) {
	addr, _ := serve(t, connlimit.HTTP{MaxHeaderBytes: 1 << 10})
	req, _ := http.NewRequest("GET", "http://"+addr+"/", nil)
	req.Header.Set("X-Big", strings.Repeat("a", 8<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("8 KiB of headers with a 1 KiB cap: %d, want 431", resp.StatusCode)
	}
}

func TestIdleTimeoutClosesKeptAliveConnection(t *testing.T) {
	addr, _ := serve(t, connlimit.HTTP{IdleTimeout: 200 * time.Millisecond})
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if body := get(t, c, bufio.NewReader(c), "ok"); body != "ok" {
		t.Fatalf("body %q", body)
	}
	if !connlimittest.ClosedWithin(c, 5*time.Second) {
		t.Fatal("an idle kept-alive connection was still open after 5s (idle timeout 200ms)")
	}
}

// Past the cap the oldest half-open connections are closed; the newest stay, a client
// that sends its request is answered, and an authenticated connection is never shed.
func TestPendingCapShedsTheOldest(t *testing.T) {
	const max = 8
	addr, pl := serve(t, connlimit.HTTP{MaxPending: max, HeaderTimeout: time.Minute})

	trusted, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer trusted.Close()
	tr := bufio.NewReader(trusted)
	get(t, trusted, tr, "ok")
	anon, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	get(t, anon, bufio.NewReader(anon), "")
	// The server counts the answered connection as pending (idle) once it has written
	// the answer, which may be after the client read it: wait, so that it is the oldest.
	for deadline := time.Now().Add(5 * time.Second); pl.PendingConns() != 1; {
		if time.Now().After(deadline) {
			t.Fatalf("%d pending connections after one anonymous request, want 1", pl.PendingConns())
		}
		time.Sleep(time.Millisecond)
	}

	var conns []net.Conn
	for i := 0; i < 5*max; i++ {
		conns = append(conns, connlimittest.HalfOpen(t, addr))
	}
	// The anonymous idle connection and the oldest half-open ones were shed.
	for i, c := range append([]net.Conn{anon}, conns[:len(conns)-max]...) {
		if !connlimittest.ClosedWithin(c, 5*time.Second) {
			t.Fatalf("connection %d of %d past the cap of %d is still open", i, len(conns)+1, max)
		}
	}
	if n := pl.PendingConns(); n != max {
		t.Fatalf("%d pending connections, want the cap, %d", n, max)
	}
	for i, c := range conns[len(conns)-max:] {
		if connlimittest.ClosedWithin(c, 10*time.Millisecond) {
			t.Fatalf("newest connection %d was closed, but it was within the cap", i)
		}
	}
	if body := get(t, trusted, tr, "ok"); body != "ok" {
		t.Fatalf("the authenticated connection after the flood: %q", body)
	}
	resp, err := http.Get("http://" + addr + "/")
	if err != nil {
		t.Fatalf("a new client during the flood: %v", err)
	}
	resp.Body.Close()
}

// serveChild is the server of TestMoreHalfOpenThanFileDescriptors: a process allowed 64
// open files, serving HTTP (16 pending at most) and raw TCP (16 connections at most).
func serveChild() {
	lim := syscall.Rlimit{Cur: 64, Max: 64}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		fmt.Println("setrlimit:", err)
		os.Exit(1)
	}
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	srv, pl := connlimit.NewServer(hl, handler(), connlimit.HTTP{MaxPending: 16, HeaderTimeout: time.Minute})
	go srv.Serve(pl)
	capped := connlimit.Cap(tl, 16, "test", nil)
	go func() {
		for {
			c, err := capped.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	fmt.Println(hl.Addr(), tl.Addr())
	io.Copy(io.Discard, os.Stdin) // the parent closes stdin when done
}

// With ten times more half-open connections (HTTP and raw TCP) than the server process
// may hold open files, a request still answers within a second.
func TestMoreHalfOpenThanFileDescriptors(t *testing.T) {
	exe, _ := os.Executable()
	child := exec.Command(exe, "-test.run=^$")
	child.Env = append(os.Environ(), childEnv+"=1")
	stdin, _ := child.StdinPipe()
	stdout, _ := child.StdoutPipe()
	child.Stderr = os.Stderr
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer child.Wait()
	defer stdin.Close()
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	addrs := strings.Fields(line)
	if len(addrs) != 2 {
		t.Fatalf("child: %q", line)
	}
	for i := 0; i < 320; i++ {
		connlimittest.HalfOpen(t, addrs[0])
		c, err := net.Dial("tcp", addrs[1])
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	start := time.Now()
	cl := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := cl.Get("http://" + addrs[0] + "/")
	if err != nil {
		t.Fatalf("a request past 640 half-open connections to a process allowed 64 files: %v", err)
	}
	resp.Body.Close()
	if d := time.Since(start); d > time.Second || resp.StatusCode != 200 {
		t.Fatalf("answered %d in %s, want 200 within 1s", resp.StatusCode, d)
	}
}

// A request that announces a body and never sends it is closed after the header
// timeout unless a handler trusts it: an untrusted request cannot hold its connection
// by stalling its body. A trusted one may send its body as slowly as it likes.
func TestStalledBodyIsClosedUnlessTrusted(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, pl := connlimit.NewServer(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "ok" {
			w.WriteHeader(http.StatusUnauthorized) // the server then drains the body
			return
		}
		connlimit.Trust(r.Context())
		b, err := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%d %v", len(b), err)
	}), connlimit.HTTP{HeaderTimeout: 300 * time.Millisecond})
	go srv.Serve(pl)
	defer srv.Close()

	stalled, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	fmt.Fprintf(stalled, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
	if !connlimittest.ClosedWithin(stalled, 5*time.Second) {
		t.Error("an unauthenticated request with a stalled body was still open after 5s (header timeout 300ms)")
	}

	slow, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	fmt.Fprintf(slow, "POST / HTTP/1.1\r\nHost: x\r\nAuthorization: ok\r\nContent-Length: 4\r\n\r\n")
	for _, b := range "body" {
		time.Sleep(200 * time.Millisecond) // 800 ms in all, past the header timeout
		fmt.Fprintf(slow, "%c", b)
	}
	slow.SetDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(slow), nil)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	if string(got) != "4 <nil>" {
		t.Errorf("a trusted slow body: %q", got)
	}
}

// ProgressBody lets a body take as long as it needs while each read makes progress,
// and cuts one that stalls.
func TestProgressBody(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, pl := connlimit.NewServer(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		connlimit.ProgressBody(w, r, 300*time.Millisecond)
		b, err := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%d %v", len(b), err == nil)
	}), connlimit.HTTP{HeaderTimeout: 300 * time.Millisecond})
	go srv.Serve(pl)
	defer srv.Close()
	send := func(pause time.Duration) string {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
		for i := 0; i < 5; i++ {
			time.Sleep(pause)
			c.Write([]byte("x"))
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return "closed"
		}
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	if got := send(150 * time.Millisecond); got != "5 true" {
		t.Errorf("a body that keeps coming (750 ms in all): %q", got)
	}
	if got := send(time.Second); got == "5 true" {
		t.Errorf("a body that stalls for 1s with a 300 ms progress deadline was read whole")
	}
}
