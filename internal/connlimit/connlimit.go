// Package connlimit keeps slow and hostile clients from holding a server's file
// descriptors, so that a flood of connections that never finish a request cannot take
// the descriptors that the API, the proxy, machines' logs and disks need.
//
// An HTTP listener (NewServer) gets a header timeout, an idle timeout, a header size cap
// and a cap on pending connections: those not in the middle of a request and not yet
// trusted (a handler calls Trust once it has authenticated the request). Past that cap
// the oldest pending connection is closed, not the new one: a client that sends its
// request at once is served however many half-open connections an attacker keeps
// opening. A raw TCP listener (Cap) gets a plain connection cap, past which new
// connections are closed at once, and Pipe closes a connection that goes idle.
//
// A request whose headers arrived is no longer pending, but until a handler trusts it,
// its body must arrive within the header timeout too: otherwise a client could send
// headers announcing a body and never send it, and hold the connection for ever while
// the server waits to read it. A handler that serves untrusted clients on purpose (the
// proxy) replaces that deadline with one per read (ProgressBody).
//
// The API server (cmd/kiln) and the proxy (internal/proxy) build their listeners here.
package connlimit

import (
	"container/list"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// HTTP are the limits of one HTTP listener. Zero fields take DefaultHTTP's values.
type HTTP struct {
	// HeaderTimeout is how long a client has to send a request's headers.
	HeaderTimeout time.Duration
	// IdleTimeout is how long a kept-alive connection may wait for its next request.
	IdleTimeout time.Duration
	// MaxHeaderBytes bounds a request's headers; past it the client gets 431.
	MaxHeaderBytes int
	// MaxPending bounds the connections that are neither in a request nor trusted.
	MaxPending int
	// Log, if set, hears (at most once a minute) that pending connections were shed.
	Log func(format string, args ...any)
	// What names the listener and the setting in Log's messages.
	What string
}

// DefaultHTTP are the limits of an HTTP listener unless configured otherwise.
var DefaultHTTP = HTTP{HeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 64 << 10, MaxPending: 1024}

// WithDefaults fills the zero fields from DefaultHTTP.
func (h HTTP) WithDefaults() HTTP {
	if h.HeaderTimeout <= 0 {
		h.HeaderTimeout = DefaultHTTP.HeaderTimeout
	}
	if h.IdleTimeout <= 0 {
		h.IdleTimeout = DefaultHTTP.IdleTimeout
	}
	if h.MaxHeaderBytes <= 0 {
		h.MaxHeaderBytes = DefaultHTTP.MaxHeaderBytes
	}
	if h.MaxPending <= 0 {
		h.MaxPending = DefaultHTTP.MaxPending
	}
	return h
}

// NewServer returns an HTTP server for h with lim's limits and the listener it must
// serve on: srv.Serve(pl).
func NewServer(ln net.Listener, h http.Handler, lim HTTP) (srv *http.Server, pl *Pending) {
	lim = lim.WithDefaults()
	pl = &Pending{Listener: ln, max: lim.MaxPending, body: lim.HeaderTimeout, conns: map[net.Conn]*entry{},
		shed: reporter{log: lim.Log, what: "half-open connection(s) closed on " + lim.What}}
	srv = &http.Server{
		Handler:           h,
		ReadHeaderTimeout: lim.HeaderTimeout,
		IdleTimeout:       lim.IdleTimeout,
		MaxHeaderBytes:    lim.MaxHeaderBytes,
		ConnState:         pl.connState,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, connRef{pl, c})
		},
	}
	return srv, pl
}

// Pending is a listener that keeps at most a set number of pending connections open,
// closing the oldest past it. Serve it only through the server NewServer returns: that
// server tells it when each connection's state changes.
type Pending struct {
	net.Listener
	max  int
	body time.Duration // how long an untrusted request's body may take

	mu      sync.Mutex
	conns   map[net.Conn]*entry // open connections the server still owns
	pending list.List           // of *entry, oldest first
	shed    reporter
}

type entry struct {
	c       net.Conn
	trusted bool
	el      *list.Element // in pending, or nil
}

// Accept accepts a connection as pending, closing the oldest pending one if that makes
// one too many.
func (l *Pending) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	e := &entry{c: c}
	l.mu.Lock()
	l.conns[c] = e
	l.pendLocked(e)
	var victim net.Conn
	if l.pending.Len() > l.max {
		old := l.pending.Front().Value.(*entry)
		l.unpendLocked(old)
		victim = old.c
	}
	l.mu.Unlock()
	if victim != nil {
		// The server's goroutine for it sees the close, and reports StateClosed.
		victim.Close()
		l.shed.add(fmt.Sprintf("more than %d were waiting for a request", l.max))
	}
	return c, nil
}

// PendingConns is how many connections are pending now.
func (l *Pending) PendingConns() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.pending.Len()
}

func (l *Pending) pendLocked(e *entry) {
	if e.el == nil && !e.trusted {
		e.el = l.pending.PushBack(e)
	}
}

func (l *Pending) unpendLocked(e *entry) {
	if e.el != nil {
		l.pending.Remove(e.el)
		e.el = nil
	}
}

// connState follows net/http's view of a connection: it stays StateNew (or StateIdle
// between requests) until a request's headers have been read, then turns StateActive.
func (l *Pending) connState(c net.Conn, s http.ConnState) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.conns[c]
	if e == nil {
		return
	}
	switch s {
	case http.StateActive:
		l.unpendLocked(e)
		if !e.trusted {
			// The server has just cleared its header deadline; the body gets one too.
			c.SetReadDeadline(time.Now().Add(l.body))
		}
	case http.StateIdle:
		l.pendLocked(e)
	case http.StateHijacked, http.StateClosed:
		// A hijacked connection belongs to its handler now: never close it from here.
		l.unpendLocked(e)
		delete(l.conns, c)
	}
}

type connKey struct{}

type connRef struct {
	l *Pending
	c net.Conn
}

// Trust marks the connection that carries ctx's request as authenticated: it no longer
// counts as pending, and is never shed, while it stays open. Call it from a handler
// served by a server from NewServer; elsewhere it does nothing.
func Trust(ctx context.Context) {
	ref, ok := ctx.Value(connKey{}).(connRef)
	if !ok {
		return
	}
	ref.l.mu.Lock()
	defer ref.l.mu.Unlock()
	if e := ref.l.conns[ref.c]; e != nil {
		e.trusted = true
		ref.l.unpendLocked(e)
		ref.c.SetReadDeadline(time.Time{})
	}
}

// ProgressBody lets an untrusted request's body take as long as it needs, provided
// each read makes progress within d: the handler of a server from NewServer calls it
// before reading the body (a proxy forwarding uploads to a tenant's app).
func ProgressBody(w http.ResponseWriter, r *http.Request, d time.Duration) {
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Time{})
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = &progressBody{ReadCloser: r.Body, rc: rc, d: d}
	}
}

type progressBody struct {
	io.ReadCloser
	rc *http.ResponseController
	d  time.Duration
}

func (b *progressBody) Read(p []byte) (int, error) {
	b.rc.SetReadDeadline(time.Now().Add(b.d))
	return b.ReadCloser.Read(p)
}

// reporter logs how many connections a limit turned away, at most once a minute, so
// that a flood is visible in the log without filling it.
type reporter struct {
	log  func(format string, args ...any)
	what string

	mu    sync.Mutex
	n     int
	since time.Time
}

func (r *reporter) add(why string) {
	if r.log == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n++
	if now := time.Now(); now.Sub(r.since) >= time.Minute {
		r.log("%d %s: %s", r.n, r.what, why)
		r.n, r.since = 0, now
	}
}

// Pending returns h with its cap on pending connections set to max, and what naming
// the listener in the log.
func (h HTTP) Pending(max int, what string) HTTP {
	h.MaxPending, h.What = max, what
	return h
}
