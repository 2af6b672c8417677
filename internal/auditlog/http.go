package auditlog

import (
	"context"
	"net"
	"net/http"
	"time"

	"github.com/kilnhq/kiln/internal/store"
)

// Recorder remembers the status a handler answered, for the entry written after it.
// Streams (logs, waits) flush through it, and http.ResponseController reaches the
// connection beneath (exec's hijack).
type Recorder struct {
	http.ResponseWriter
	code int
}

func (r *Recorder) WriteHeader(code int) {
	if r.code == 0 {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *Recorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

// Flush passes streaming through.
func (r *Recorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap gives http.ResponseController the writer beneath.
func (r *Recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// Status is the status answered: 200 for a handler that wrote nothing.
func (r *Recorder) Status() int {
	if r.code == 0 {
		return http.StatusOK
	}
	return r.code
}

// Record writes the entry for a request that ended with result: its time and source
// address are the request's, its fields clipped. The request is over, so a write that
// fails loses the entry, not the call: logf says so.
func Record(a store.Audit, r *http.Request, e store.AuditEntry, logf func(string, ...any)) {
	if a == nil {
		return
	}
	e.At = time.Now()
	if e.Source, _, _ = net.SplitHostPort(r.RemoteAddr); e.Source == "" {
		e.Source = r.RemoteAddr
	}
	e = e.Clipped()
	if err := a.AddAudit(context.WithoutCancel(r.Context()), e); err != nil && logf != nil {
		logf("audit: could not record %s %s by %s: %v", e.Action, e.Target, e.TokenID, err)
	}
}
