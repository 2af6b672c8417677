package main_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/connlimit/connlimittest"
	"github.com/kilnhq/kiln/internal/image/imagetest"
)

// openFiles counts a process's open file descriptors.
func openFiles(t *testing.T, pid int) int {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(fds)
}

// A server allowed only a few more open files than it holds is flooded with half-open
// connections, more than it may open files, on its API, its proxy's HTTP port and a raw
// TCP port. An authenticated request still answers within a second, the machine's logs
// keep coming, and the proxy keeps serving. Half-open connections are closed after the
// header timeout, and every one of these limits is listed, from the config file.
func TestSlowAndHostileClients(t *testing.T) {
	if os.Getenv("KILN_TEST_IN_NETNS") == "" {
		t.Fatal("this test must run in its own network namespace (TestMain arranges it)")
	}
	e := newEnv(t)
	addr, proxyAddr := freeAddr(t), freeAddr(t)
	_, tcpPort, _ := net.SplitHostPort(freeAddr(t))
	conf := filepath.Join(e.dataDir, "server.toml")
	os.WriteFile(conf, []byte("header-timeout = \"4s\"\napi-max-unauthenticated-conns = 32\nproxy-max-pending-conns = 32\ntcp-max-conns = 16\n"), 0o644)
	srv := startServer(t, e, addr, "--proxy-listen", proxyAddr, "--idle-timeout", "1h", "--config", conf)
	defer stopOnFailure(&srv)
	ctx := context.Background()
	tok := readToken(t, filepath.Join(e.dataDir, "admin-token"))
	cl := client.New(srv.url, tok)
	loadImage(t, srv, imagetest.App(t), "localhost/app:1")

	// A web server on 8080, public on port 80 (HTTP) and on a raw TCP port, that logs a
	// numbered tick five times a second.
	script := "mkdir -p /data; echo hello > /data/index.html; busybox httpd -p 8080 -h /data; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"
	out, errs, code := srv.kiln("", "machine", "run", "localhost/app:1", "--app", "web", "--port", "80:8080/http", "--port", tcpPort+":8080",
		"--", "sh", "-c", script)
	if code != 0 {
		t.Fatalf("machine run: %s\n%s", errs, srv.logs)
	}
	id := strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:])
	if err := cl.Wait(ctx, "web", id, "started", 90*time.Second); err != nil {
		t.Fatalf("%v\n%s", err, srv.logs)
	}
	tcpAddr := net.JoinHostPort("127.0.0.1", tcpPort)
	proxyGet := func() error {
		req, _ := http.NewRequest("GET", "http://"+proxyAddr+"/index.html", nil)
		req.Host = "web.kiln.internal"
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if b, _ := io.ReadAll(resp.Body); resp.StatusCode != 200 || string(b) != "hello\n" {
			return fmt.Errorf("%d %q", resp.StatusCode, b)
		}
		return nil
	}
	rawGet := func() error {
		c, err := net.DialTimeout("tcp", tcpAddr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET /index.html HTTP/1.0\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	var perr, rerr error
	deadline := time.Now().Add(time.Minute)
	for perr, rerr = proxyGet(), rawGet(); perr != nil || rerr != nil; perr, rerr = proxyGet(), rawGet() {
		if time.Now().After(deadline) {
			mout, _, _ := srv.kiln("", "machine", "logs", id)
			t.Fatalf("the machine does not serve through the proxy: HTTP %v, raw TCP %v\nmachine logs:\n%s\nserver:\n%s", perr, rerr, mout, srv.logs)
		}
		time.Sleep(200 * time.Millisecond)
	}
	lastTick := func() int {
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		n := -1
		cl.Logs(lctx, "web", id, false, func(l api.LogLine) error {
			if v, err := strconv.Atoi(strings.TrimPrefix(l.Message, "tick ")); err == nil {
				n = v
			}
			return nil
		})
		return n
	}

	// The server may now hold only 160 more files than it does.
	pid := srv.cmd.Process.Pid
	limit := openFiles(t, pid) + 160
	if out, err := exec.Command("prlimit", "--pid", strconv.Itoa(pid), fmt.Sprintf("--nofile=%d:%d", limit, limit)).CombinedOutput(); err != nil {
		t.Fatalf("prlimit: %v %s", err, out)
	}
	flood := func(addr string, halfOpen bool) []net.Conn {
		var cs []net.Conn
		for i := 0; i < limit+50; i++ {
			if halfOpen {
				cs = append(cs, connlimittest.HalfOpen(t, addr))
			} else {
				cs = append(cs, connlimittest.Dial(t, addr))
			}
		}
		return cs
	}
	floodStart := time.Now()
	apiFlood := flood(addr, true)
	flood(proxyAddr, true)
	rawFlood := flood(tcpAddr, false)

	// An authenticated request on a new connection answers within a second.
	for i := 0; i < 3; i++ {
		start := time.Now()
		req, _ := http.NewRequest("GET", srv.url+"/v1/apps/web/machines/"+id, nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := (&http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}).Do(req)
		if err != nil {
			t.Fatalf("an authenticated request during a flood of %d half-open connections (open files allowed: %d): %v\n%s", 3*(limit+50), limit, err, srv.logs)
		}
		resp.Body.Close()
		if d := time.Since(start); resp.StatusCode != 200 || d > time.Second {
			t.Fatalf("an authenticated request during the flood: %d in %s, want 200 within 1s", resp.StatusCode, d)
		}
	}
	// The proxy keeps serving HTTP, and the machine keeps its logs.
	if err := proxyGet(); err != nil {
		t.Fatalf("the proxy during the flood: %v\n%s", err, srv.logs)
	}
	before := lastTick()
	waitFor(t, func() bool { return lastTick() > before+2 }, fmt.Sprintf("new log lines after tick %d during the flood", before))
	if before < 0 {
		t.Fatal("no log lines read during the flood")
	}
	if n := openFiles(t, pid); n >= limit {
		t.Fatalf("the server holds %d files, its limit", n)
	}

	// Half-open connections are closed after the header timeout (4s).
	for i, c := range apiFlood[len(apiFlood)-8:] {
		if !connlimittest.ClosedWithin(c, 20*time.Second-time.Since(floodStart)) {
			t.Fatalf("half-open API connection %d still open %s after it was made (header timeout 4s)", i, time.Since(floodStart))
		}
	}
	// Once the raw TCP flood goes away, the port serves again.
	for _, c := range rawFlood {
		c.Close()
	}
	waitFor(t, func() bool { return rawGet() == nil }, "the raw TCP port to serve after the flood")

	out, errs, code = srv.kiln("", "limits", "show")
	for _, want := range []string{"http.header_timeout", "4s", "config file (header-timeout)", "http.idle_timeout", "2m0s", "http.max_header_bytes", "65536",
		"api.unauthenticated_conns", "config file (api-max-unauthenticated-conns)", "proxy.pending_conns", "proxy.tcp_conns", "config file (tcp-max-conns)",
		"proxy.tcp_idle_timeout", "10m0s", "default (flag --tcp-idle-timeout)", "process.open_files"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("limits show lacks %q: %d %s %s", want, code, out, errs)
		}
	}
	if _, errs, code := srv.kiln("", "machine", "destroy", "-f", id); code != 0 {
		t.Fatalf("destroy: %s", errs)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}
