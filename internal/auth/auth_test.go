package auth_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

var key = auth.Key("0123456789abcdef0123456789abcdef")

// records is a token store in memory that counts its reads.
type records struct {
	m     map[string]store.Token
	reads atomic.Int32
}

func (r *records) CreateToken(_ context.Context, t store.Token) error { r.m[t.ID] = t; return nil }
func (r *records) GetToken(_ context.Context, id string) (store.Token, error) {
	r.reads.Add(1)
	t, ok := r.m[id]
	if !ok {
		return t, errdefs.New(errdefs.ErrNotFound, "no token %s", id)
	}
	return t, nil
}
func (r *records) ListTokens(context.Context) ([]store.Token, error) { return nil, nil }
func (r *records) RevokeToken(_ context.Context, id string, at time.Time) error {
	t := r.m[id]
	t.RevokedAt = at
	r.m[id] = t
	return nil
}

func identity(t *testing.T, tok string) (auth.Identity, error) {
	t.Helper()
	p, err := auth.Parse(tok)
	if err != nil {
		t.Fatal(err)
	}
	if !key.Verify(p) {
		t.Fatalf("a token made by the key does not verify: %s", tok)
	}
	return auth.IdentityOf(p, time.Now())
}

func TestScopeAndRole(t *testing.T) {
	tok := key.Mint("t1", auth.RoleCaveat(auth.Deploy), auth.ScopeCaveat(auth.App("web"), auth.Project("shop")))
	id, err := identity(t, tok)
	if err != nil {
		t.Fatal(err)
	}
	if !id.May(auth.App("web"), auth.Deploy) || !id.May(auth.Project("shop"), auth.Read) {
		t.Errorf("a deploy token for web and shop: %+v", id)
	}
	if id.Reaches(auth.App("api")) || id.May(auth.App("web"), auth.Admin) || id.Operator() {
		t.Errorf("the token reaches too far: %+v", id)
	}
	op, _ := identity(t, key.Mint(auth.OperatorID))
	if !op.Operator() || !op.May(auth.App("anything"), auth.Admin) {
		t.Errorf("the operator's token: %+v", op)
	}
}

// Attenuation only narrows: a later caveat cannot raise the role, add an app or extend
// the expiry, and whatever it says, the token reaches no more than before.
func TestAttenuateNeverWidens(t *testing.T) {
	base := key.Mint("t1", auth.RoleCaveat(auth.Read), auth.ScopeCaveat(auth.App("web")), auth.ExpiresCaveat(time.Now().Add(time.Hour)))
	p, _ := auth.Parse(base)
	for name, caveat := range map[string]string{
		"role":   auth.RoleCaveat(auth.Admin),
		"scope":  auth.ScopeCaveat(auth.App("web"), auth.App("api")),
		"expiry": auth.ExpiresCaveat(time.Now().Add(1000 * time.Hour)),
	} {
		id, err := identity(t, p.Attenuate(caveat))
		if err != nil {
			t.Fatal(err)
		}
		if id.Role != auth.Read || id.Reaches(auth.App("api")) || !id.Reaches(auth.App("web")) || id.Expires.After(time.Now().Add(time.Hour)) {
			t.Errorf("attenuating with %s widened the token: %+v", name, id)
		}
	}
	// Narrowing to another app leaves nothing.
	id, _ := identity(t, p.Attenuate(auth.ScopeCaveat(auth.App("api"))))
	if id.Reaches(auth.App("web")) || id.Reaches(auth.App("api")) {
		t.Errorf("web narrowed to api reaches %+v", id.Scope)
	}
	// A narrowed operator token is no longer the operator.
	op, _ := auth.Parse(key.Mint(auth.OperatorID))
	id, _ = identity(t, op.Attenuate(auth.ScopeCaveat(auth.App("web")), auth.RoleCaveat(auth.Read)))
	if id.Operator() || id.May(auth.App("web"), auth.Deploy) || !id.May(auth.App("web"), auth.Read) {
		t.Errorf("the operator's token narrowed to reading web: %+v", id)
	}
}

// Dropping, changing or reordering a caveat, or using another key, breaks the chain.
func TestTamperedTokensFail(t *testing.T) {
	tok := key.Mint("t1", auth.RoleCaveat(auth.Read), auth.ScopeCaveat(auth.App("web")))
	p, _ := auth.Parse(tok)
	forge := func(caveats ...string) auth.Token {
		f, _ := auth.Parse(auth.Token{ID: p.ID}.Attenuate(caveats...))
		// Keep the genuine signature; only the caveats change.
		sig := tok[strings.LastIndex(tok, "."):]
		s := f.Attenuate()
		f2, _ := auth.Parse(s[:strings.LastIndex(s, ".")] + sig)
		return f2
	}
	for name, f := range map[string]auth.Token{
		"dropped scope": forge(auth.RoleCaveat(auth.Read)),
		"changed role":  forge(auth.RoleCaveat(auth.Admin), auth.ScopeCaveat(auth.App("web"))),
		"reordered":     forge(auth.ScopeCaveat(auth.App("web")), auth.RoleCaveat(auth.Read)),
	} {
		if key.Verify(f) {
			t.Errorf("%s: a token with altered caveats verifies", name)
		}
	}
	if auth.Key("another key, another cluster....").Verify(p) {
		t.Error("a token verifies under another key")
	}
	if _, err := auth.Parse(tok[:len(tok)-4]); err == nil {
		if q, _ := auth.Parse(tok[:len(tok)-4]); key.Verify(q) {
			t.Error("a truncated token verifies")
		}
	}
}

func TestCheckerRefusesExpiredUnknownAndRevoked(t *testing.T) {
	recs := &records{m: map[string]store.Token{"t1": {ID: "t1"}, "t2": {ID: "t2"}}}
	now := time.Now()
	c := &auth.Checker{Key: key, Tokens: recs, Now: func() time.Time { return now }}
	ctx := context.Background()
	for name, tok := range map[string]string{
		"expired":   key.Mint("t1", auth.ExpiresCaveat(now.Add(-time.Second))),
		"unknown":   key.Mint("t9", auth.RoleCaveat(auth.Read)),
		"other key": auth.Key("another key, another cluster....").Mint("t1"),
		"garbage":   "hunter2",
		"empty":     "",
		"caveat":    key.Mint("t1", "ip=10.0.0.1"),
	} {
		if _, err := c.Check(ctx, tok); !errors.Is(err, errdefs.ErrUnauthenticated) {
			t.Errorf("%s token: %v, want unauthenticated", name, err)
		}
	}
	good := key.Mint("t2", auth.RoleCaveat(auth.Deploy))
	if _, err := c.Check(ctx, good); err != nil {
		t.Fatal(err)
	}
	// Revoked through the store (as another host would): refused once the record is
	// read again, which is at most Recheck later.
	recs.RevokeToken(ctx, "t2", now)
	now = now.Add(auth.Recheck)
	if _, err := c.Check(ctx, good); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Errorf("a revoked token after %s: %v", auth.Recheck, err)
	}
	// Within Recheck the record is not read again.
	before := recs.reads.Load()
	for range 100 {
		c.Check(ctx, good)
	}
	if n := recs.reads.Load() - before; n != 0 {
		t.Errorf("100 checks within %s read the record %d times", auth.Recheck, n)
	}
}

func TestFromHeader(t *testing.T) {
	tok := key.Mint("t1")
	for _, h := range []string{"Bearer " + tok, "bearer " + tok, "FlyV1 " + tok, "FlyV1 fm2_other," + tok} {
		if got := auth.FromHeader(h); got != tok {
			t.Errorf("%q: got %q", h, got)
		}
	}
	if got := auth.FromHeader("Basic abc"); got != "" {
		t.Errorf("basic: %q", got)
	}
}
