// Package reqid gives every API call an id that follows it: into the answer's
// Kiln-Request-Id header, onto every log line about the call (on this host, on a host
// the call is forwarded to, and in the guest agent's console), so one grep finds them
// all. The API's handler (internal/server) sets it; whatever serves the call reads it
// from the context (serverlog.For puts it on a logger).
//
// The guest agent's protocol package links it into kiln-init, so it imports nothing
// heavier than the context: no net/http, no log/slog.
package reqid

import (
	"context"
	"crypto/rand"
	"encoding/hex"
)

// Header carries the id both ways: a client may choose it, and every answer names it.
const Header = "Kiln-Request-Id"

// AltHeader is what proxies and other tools send; it is taken when Header is absent.
const AltHeader = "X-Request-Id"

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

// Choose is the call's id given the values of its Header and AltHeader: the client's
// (Header's, else AltHeader's) if it is one Valid value, else a new one.
func Choose(ids, altIDs []string) string {
	if len(ids) == 0 {
		ids = altIDs
	}
	if len(ids) == 1 && Valid(ids[0]) {
		return ids[0]
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
