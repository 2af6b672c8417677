package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/metrics"
)

// portListener serves one public port: HTTP routed by Host, or raw TCP.
type portListener struct {
	ln   net.Listener
	http bool
	srv  *http.Server
	once sync.Once
}

func (l *portListener) Close() {
	l.once.Do(func() {
		if l.srv != nil {
			l.srv.Close()
		} else {
			l.ln.Close()
		}
	})
}

func (p *Proxy) listen(port int, addr string, isHTTP bool) (*portListener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	l := &portListener{ln: ln, http: isHTTP}
	if isHTTP {
		lim := p.cfg.HTTP
		lim.What = fmt.Sprintf("proxy port %d", port)
		lim.Log = p.logf
		var pl *connlimit.Pending
		l.srv, pl = connlimit.NewServer(ln, p.httpHandler(port), lim)
		go l.srv.Serve(pl)
	} else {
		go p.serveTCP(port, connlimit.Cap(ln, p.cfg.TCPMaxConns, fmt.Sprintf("raw TCP port %d", port), p.logf))
	}
	return l, nil
}

type leaseKey struct{}

// transport dials the machine the request's lease names.
var transport = &http.Transport{
	DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		l := ctx.Value(leaseKey{}).(*lease)
		return (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, "tcp", l.addr())
	},
	MaxIdleConnsPerHost: 64,
	IdleConnTimeout:     30 * time.Second,
}

func (p *Proxy) httpHandler(port int) http.Handler {
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			l := r.In.Context().Value(leaseKey{}).(*lease)
			r.Out.URL.Scheme = "http"
			r.Out.URL.Host = l.addr()
			r.Out.Host = r.In.Host
			r.SetXForwarded()
		},
		Transport: transport,
		ModifyResponse: func(resp *http.Response) error {
			l := resp.Request.Context().Value(leaseKey{}).(*lease)
			metrics.ProxyUpstream.WithLabelValues(l.target.App).Observe(time.Since(l.sent).Seconds())
			metrics.ProxyRequests.WithLabelValues(l.target.App, strconv.Itoa(resp.StatusCode)).Inc()
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			l := r.Context().Value(leaseKey{}).(*lease)
			p.logf("machine %s of app %s: %v", l.target.ID, l.target.App, err)
			metrics.ProxyRequests.WithLabelValues(l.target.App, strconv.Itoa(http.StatusBadGateway)).Inc()
			http.Error(w, "the machine did not answer", http.StatusBadGateway)
		},
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host := strings.ToLower(r.Host)
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		app, ok := strings.CutSuffix(host, "."+p.cfg.Domain)
		if !ok || app == "" || strings.Contains(app, ".") {
			// Says nothing about which apps exist.
			http.Error(w, "no app is served at this address", http.StatusNotFound)
			return
		}
		l, err := p.acquire(r.Context(), app, port, true)
		if errors.Is(err, ErrNoService) {
			http.Error(w, "no app is served at this address", http.StatusNotFound)
			return
		}
		if err != nil {
			// The app has services (ErrNoService is answered above): its name is a real one.
			metrics.ProxyRequests.WithLabelValues(app, strconv.Itoa(http.StatusServiceUnavailable)).Inc()
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		defer l.release()
		// Uploads to the app may be long; a stalled one is cut after a header timeout.
		connlimit.ProgressBody(w, r, p.cfg.HTTP.WithDefaults().HeaderTimeout)
		w.Header().Set("Kiln-Machine", l.target.ID)
		l.sent = time.Now()
		rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), leaseKey{}, l)))
	})
}

// serveTCP pipes each connection to a machine of the app that owns the port; ln caps
// how many are open, and a connection idle both ways is closed.
func (p *Proxy) serveTCP(port int, ln net.Listener) {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			// Out of descriptors, for a moment: wait and accept again, as net/http does.
			// Anything else means the listener was closed.
			if ne, ok := err.(net.Error); ok && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return
		}
		delay = 0
		go func() {
			defer c.Close()
			app := p.tcpOwner(port)
			if app == "" {
				return
			}
			l, err := p.acquire(context.Background(), app, port, false)
			if err != nil {
				p.logf("port %d: %v", port, err)
				return
			}
			defer l.release()
			metrics.ProxyTCPConnections.WithLabelValues(app).Inc()
			m, err := (&net.Dialer{Timeout: 5 * time.Second}).Dial("tcp", l.addr())
			if err != nil {
				p.logf("port %d: machine %s: %v", port, l.target.ID, err)
				return
			}
			connlimit.Pipe(c, m, p.cfg.TCPIdleTimeout)
		}()
	}
}

// tcpOwner is the app with a raw TCP service on port.
func (p *Proxy) tcpOwner(port int) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, t := range p.targets {
		if _, ok := serviceOn(t, port, false); ok {
			return t.App
		}
	}
	return ""
}
