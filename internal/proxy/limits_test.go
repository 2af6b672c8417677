package proxy

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/connlimit/connlimittest"
	"github.com/kilnhq/kiln/internal/machine"
)

func TestHTTPHeaderTimeout(t *testing.T) {
	f := newFake()
	f.add(t, "w1", "web", machine.Started, web("off"))
	p := startProxyWith(t, f, Config{IdleTimeout: time.Hour, HTTP: connlimit.HTTP{HeaderTimeout: 200 * time.Millisecond}})
	c := connlimittest.HalfOpen(t, p.Addr())
	if !connlimittest.ClosedWithin(c, 5*time.Second) {
		t.Fatal("a connection that never finished its headers was still open after 5s (header timeout 200ms)")
	}
}

// Half-open connections past the cap are shed, oldest first, and a client that sends
// its request is answered meanwhile.
func TestHTTPPendingCap(t *testing.T) {
	f := newFake()
	f.add(t, "w1", "web", machine.Started, web("off"))
	p := startProxyWith(t, f, Config{IdleTimeout: time.Hour, HTTP: connlimit.HTTP{HeaderTimeout: time.Minute, MaxPending: 4}})
	var conns []net.Conn
	for i := 0; i < 12; i++ {
		conns = append(conns, connlimittest.HalfOpen(t, p.Addr()))
	}
	for i, c := range conns[:8] {
		if !connlimittest.ClosedWithin(c, 5*time.Second) {
			t.Fatalf("half-open connection %d of 12 is still open past a cap of 4", i)
		}
	}
	if code, body := get(t, p, "web.kiln.internal", "/"); code != 200 || !strings.HasPrefix(body, "w1") {
		t.Fatalf("a request among half-open connections: %d %q", code, body)
	}
}

// waitPort waits for the proxy to listen on a public port.
func waitPort(t *testing.T, p *Proxy, port int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		p.mu.Lock()
		l := p.ports[port]
		p.mu.Unlock()
		if l != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the proxy does not listen on port %d", port)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A raw TCP port keeps at most its cap of connections open, refusing more at once, and
// closes connections through which nothing passed for the idle time.
func TestRawTCPCapAndIdleTimeout(t *testing.T) {
	f := newFake()
	port := freePort(t)
	f.add(t, "t1", "db", machine.Started, api.Service{Protocol: "tcp", Ports: []api.ServicePort{{Port: port}}})
	p := startProxyWith(t, f, Config{IdleTimeout: time.Hour, TCPMaxConns: 2, TCPIdleTimeout: 2 * time.Second})
	waitPort(t, p, port)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	a, b := connlimittest.Dial(t, addr), connlimittest.Dial(t, addr)
	start := time.Now()
	if over := connlimittest.Dial(t, addr); !connlimittest.ClosedWithin(over, time.Second) {
		t.Fatal("a third connection to a port capped at 2 was not closed at once")
	}
	if !connlimittest.ClosedWithin(a, 10*time.Second) || !connlimittest.ClosedWithin(b, 10*time.Second) {
		t.Fatal("idle raw TCP connections were still open 10s after an idle timeout of 2s")
	}
	if d := time.Since(start); d < 1500*time.Millisecond {
		t.Fatalf("idle connections closed after %s, before the idle timeout of 2s", d)
	}
	// With room again, the port serves.
	c := connlimittest.Dial(t, addr)
	fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: x\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("a request once the idle connections were closed: %v %v", resp, err)
	}
}
