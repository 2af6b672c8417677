package sqlstore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

func TestTokensAndAudit(t *testing.T) { forEachDialect(t, testTokensAndAudit) }

// Token records round-trip with their times; a revocation keeps its first time; the
// audit log filters by app, apps and time, keeps the newest within its limit, and
// retention deletes only what is older.
func testTokensAndAudit(t *testing.T, dsn string) {
	db := open(t, dsn)
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Second)
	tok := store.Token{ID: "tok_1", Hash: "h1", Description: "read on app:web", CreatedBy: "admin", CreatedAt: now, ExpiresAt: now.Add(time.Hour)}
	if err := db.CreateToken(ctx, tok); err != nil {
		t.Fatal(err)
	}
	if err := db.CreateToken(ctx, tok); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("the same ID twice: %v", err)
	}
	got, err := db.GetToken(ctx, "tok_1")
	if err != nil || !got.ExpiresAt.Equal(tok.ExpiresAt) || !got.RevokedAt.IsZero() || got.Hash != "h1" {
		t.Fatalf("token read back: %+v %v", got, err)
	}
	db.RevokeToken(ctx, "tok_1", now.Add(time.Minute))
	db.RevokeToken(ctx, "tok_1", now.Add(time.Hour))
	if got, _ := db.GetToken(ctx, "tok_1"); !got.RevokedAt.Equal(now.Add(time.Minute)) {
		t.Errorf("revoked at %v, want the first revocation's time", got.RevokedAt)
	}
	if err := db.RevokeToken(ctx, "tok_9", now); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("revoking an unknown token: %v", err)
	}

	for i, app := range []string{"web", "api", "web", "web"} {
		db.AddAudit(ctx, store.AuditEntry{At: now.Add(time.Duration(i-3) * 24 * time.Hour), TokenID: "tok_1", App: app, Action: "POST x", Result: 200, Source: "127.0.0.1"})
	}
	count := func(f store.AuditFilter) int {
		es, err := db.ListAudit(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		return len(es)
	}
	if n := count(store.AuditFilter{App: "web"}); n != 3 {
		t.Errorf("web's entries: %d", n)
	}
	if n := count(store.AuditFilter{Apps: []string{"api"}}); n != 1 {
		t.Errorf("entries of apps [api]: %d", n)
	}
	if n := count(store.AuditFilter{Apps: []string{}}); n != 0 {
		t.Errorf("entries of no app: %d", n)
	}
	if n := count(store.AuditFilter{Since: now.Add(-36 * time.Hour)}); n != 2 {
		t.Errorf("entries of the last 36 h: %d", n)
	}
	if es, _ := db.ListAudit(ctx, store.AuditFilter{Limit: 1}); len(es) != 1 || !es[0].At.Equal(now) {
		t.Errorf("the newest entry: %+v", es)
	}
	if n, err := db.PruneAudit(ctx, now.Add(-36*time.Hour)); err != nil || n != 2 {
		t.Errorf("pruning: %d %v, want 2", n, err)
	}
	if n := count(store.AuditFilter{}); n != 2 {
		t.Errorf("entries after pruning: %d", n)
	}
}
