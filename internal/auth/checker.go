package auth

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

// OperatorID is the operator's token's ID. It has no record: it is minted from the key,
// and replacing the key (DATA_DIR/token-key, or the cluster's) replaces it.
const OperatorID = "admin"

// Recheck is how long a token's record (revoked or not) is trusted before it is read
// again: a revocation on one host is honoured by every host within it.
const Recheck = time.Second

// maxCached bounds the records kept between checks.
const maxCached = 10000

// ErrUnauthenticated is a call without a token kiln accepts.
var ErrUnauthenticated = errdefs.ErrUnauthenticated

// Checker turns a request's token into an identity.
type Checker struct {
	Key    Key
	Tokens store.Tokens
	// Now is the clock; nil is time.Now.
	Now func() time.Time

	mu    sync.Mutex
	cache map[string]cached
}

type cached struct {
	rec store.Token
	err error
	at  time.Time
}

func (c *Checker) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// FromHeader reads the token of an Authorization header: "Bearer TOKEN", or "FlyV1
// TOKEN[,TOKEN...]" as Fly's client sends tokens (the first kiln token of the list).
func FromHeader(h string) string {
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") && !strings.EqualFold(scheme, "FlyV1") {
		return ""
	}
	for _, t := range strings.Split(tok, ",") {
		if t = strings.TrimSpace(t); strings.HasPrefix(t, Prefix) {
			return t
		}
	}
	return strings.TrimSpace(tok)
}

// FromRequest finds a request's token: in its Authorization header, or as the password
// of basic authentication (how docker login and BuildKit send it to the registry).
func FromRequest(r *http.Request) string {
	if _, pw, ok := r.BasicAuth(); ok {
		return pw
	}
	return FromHeader(r.Header.Get("Authorization"))
}

// Check verifies a token and returns its identity. Every refusal wraps
// ErrUnauthenticated and says why.
func (c *Checker) Check(ctx context.Context, token string) (Identity, error) {
	if token == "" {
		return Identity{}, errdefs.Wrap(ErrUnauthenticated, errors.New("no token"), "send Authorization: Bearer TOKEN (the operator's token is in DATA_DIR/admin-token; others come from `kiln tokens create`)")
	}
	t, err := Parse(token)
	if err != nil {
		return Identity{}, errdefs.Wrap(ErrUnauthenticated, err, "wrong token")
	}
	if !c.Key.Verify(t) {
		return Identity{}, errdefs.Wrap(ErrUnauthenticated, errors.New("its signature does not match"), "wrong token (altered, or made by another kiln cluster)")
	}
	id, err := IdentityOf(t, c.now())
	if err != nil {
		return Identity{}, errdefs.Wrap(ErrUnauthenticated, err, "token refused")
	}
	if t.ID == OperatorID {
		if len(t.Caveats) > 0 {
			// A narrowed copy would have no record of its own to revoke: it would stay
			// good until the key is replaced. Narrow tokens that can be revoked.
			return Identity{}, errdefs.New(errdefs.ErrUnauthenticated, "the operator's token cannot be narrowed: make a token with `kiln tokens create`, which can be revoked, and narrow that")
		}
		return id, nil
	}
	rec, err := c.record(ctx, t.ID)
	if errors.Is(err, errdefs.ErrNotFound) {
		return Identity{}, errdefs.Wrap(ErrUnauthenticated, err, "token %s is not one this cluster issued", t.ID)
	}
	if err != nil {
		return Identity{}, err
	}
	if !rec.RevokedAt.IsZero() {
		return Identity{}, errdefs.Wrap(ErrUnauthenticated, errors.New("revoked"), "token %s was revoked at %s", t.ID, rec.RevokedAt.UTC().Format(time.RFC3339))
	}
	return id, nil
}

// record reads a token's record, trusting a copy up to Recheck old.
func (c *Checker) record(ctx context.Context, id string) (store.Token, error) {
	now := c.now()
	c.mu.Lock()
	e, ok := c.cache[id]
	c.mu.Unlock()
	if ok && now.Sub(e.at) < Recheck && now.Sub(e.at) >= 0 {
		return e.rec, e.err
	}
	if c.Tokens == nil {
		return store.Token{}, errdefs.New(errdefs.ErrNotFound, "no token %s", id)
	}
	rec, err := c.Tokens.GetToken(ctx, id)
	if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		return store.Token{}, err // the store's trouble: not remembered
	}
	c.mu.Lock()
	if c.cache == nil || len(c.cache) >= maxCached {
		c.cache = map[string]cached{}
	}
	c.cache[id] = cached{rec: rec, err: err, at: now}
	c.mu.Unlock()
	return rec, err
}

// Forget drops what the checker remembers of a token, so that its own host honours a
// revocation at once.
func (c *Checker) Forget(id string) {
	c.mu.Lock()
	delete(c.cache, id)
	c.mu.Unlock()
}
