// Package reqid gives every API call an id that follows it: into the answer's
// Kiln-Request-Id header, onto every log line about the call (on this host, on a host
// the call is forwarded to, and in the guest agent's console), so one grep finds them
// all. The API's handler (internal/server) sets it; whatever serves the call reads it
// from the context.
package reqid

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/http"
)

// Header carries the id both ways: a client may choose it, and every answer names it.
const Header = "Kiln-Request-Id"

// altHeader is what proxies and other tools send; it is taken when Header is absent.
const altHeader = "X-Request-Id"

// MaxLen bounds a client's id: it goes into every log line about the call.
const MaxLen = 64

// Attr is the log attribute's key.
const Attr = "request_id"

// Valid says whether a client's id may be used as given: 1 to MaxLen characters of
// [A-Za-z0-9._-]. Anything else (newlines, quotes, spaces, a long string) could forge or
// bloat log lines, so it is replaced rather than cleaned.
func Valid(id string) bool {
	if id == "" || len(id) > MaxLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// New returns a fresh random id.
func New() string {
	var b [12]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// FromRequest is the call's id: the client's (Kiln-Request-Id, else X-Request-Id) if it
// is Valid, else a new one.
func FromRequest(r *http.Request) string {
	for _, h := range []string{Header, altHeader} {
		if v := r.Header.Values(h); len(v) == 1 && Valid(v[0]) {
			return v[0]
		}
		if r.Header.Get(h) != "" {
			break // one the client sent but may not use: not an excuse to try the other
		}
	}
	return New()
}

type key struct{}

// With returns ctx carrying id.
func With(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, key{}, id)
}

// From returns ctx's id, or "" outside an API call.
func From(ctx context.Context) string {
	id, _ := ctx.Value(key{}).(string)
	return id
}

// Logger returns base with ctx's id on every line (base itself outside an API call). A
// nil base logs nothing.
func Logger(ctx context.Context, base *slog.Logger) *slog.Logger {
	if base == nil {
		return slog.New(slog.DiscardHandler)
	}
	if id := From(ctx); id != "" {
		return base.With(Attr, id)
	}
	return base
}
