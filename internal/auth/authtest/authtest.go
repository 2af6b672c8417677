// Package authtest gives tests of code behind authentication a checker, the
// operator's token for it, and tokens issued with records as a server issues them.
package authtest

import (
	"context"
	"sync"
	"time"

	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

// Key is a fixed key that no server uses.
var Key = auth.Key("kiln test key, never used by a server")

// Records keeps token records in memory.
type Records struct {
	mu sync.Mutex
	m  map[string]store.Token
}

var _ store.Tokens = (*Records)(nil)

func (r *Records) CreateToken(_ context.Context, t store.Token) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[string]store.Token{}
	}
	r.m[t.ID] = t
	return nil
}

func (r *Records) GetToken(_ context.Context, id string) (store.Token, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t, ok := r.m[id]
	if !ok {
		return t, errdefs.New(errdefs.ErrNotFound, "no token %s", id)
	}
	return t, nil
}

func (r *Records) ListTokens(context.Context) ([]store.Token, error) { return nil, nil }

func (r *Records) RevokeToken(_ context.Context, id string, at time.Time) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	t := r.m[id]
	t.RevokedAt = at
	r.m[id] = t
	return nil
}

// Operator returns a checker over Key with records in memory, and the operator's token.
func Operator() (*auth.Checker, string) {
	return &auth.Checker{Key: Key, Tokens: &Records{}}, Key.Mint(auth.OperatorID)
}

// Issue mints a token under the checker's key and records it, as POST /v1/tokens does.
func Issue(c *auth.Checker, id string, caveats ...string) string {
	c.Tokens.CreateToken(context.Background(), store.Token{ID: id, Hash: auth.Hash(id), CreatedAt: time.Now()})
	return c.Key.Mint(id, caveats...)
}
