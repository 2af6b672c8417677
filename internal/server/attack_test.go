package server_test

// Tests from the attacker's review of issue 13: each failed while the hole it names was open.

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/store"
)

// An audit entry's fields come from the request path, so a caller sizes each row: with
// any valid token (not rate-limited at all) or none (20 rows a second), ~60 KiB a row
// fills the disk. Entries must be bounded.
func TestAttackAuditEntryIsBounded(t *testing.T) {
	tn := newTenants(t)
	read := tn.token(api.CreateTokenRequest{Apps: []string{"a"}, Role: "read"}).Token
	long := strings.Repeat("x", 60<<10)
	tn.call("POST", "/v1/apps/a/machines/"+long+"/stop", read, nil) // 403, recorded
	tn.call("POST", "/v1/apps/"+long+"/machines", read, nil)        // 404, recorded
	tn.call("POST", "/v1/apps/a/machines/"+long+"/stop", "", nil)   // 401, recorded
	es, err := tn.db.ListAudit(context.Background(), store.AuditFilter{})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if n := len(e.App) + len(e.Target) + len(e.Action) + len(e.TokenID) + len(e.Source); n > 2048 {
			t.Errorf("audit entry %q by %q holds %d bytes from the request path", e.Action, e.TokenID, n)
		}
	}
}

// A token for app a asking for b's machine under its own app's path gets 404, but the
// message differs from an unknown machine's: it confirms b's machine exists.
func TestAttackForeignMachineIDIsIndistinguishable(t *testing.T) {
	tn := newTenants(t)
	a := tn.token(api.CreateTokenRequest{Apps: []string{"a"}, Role: "read"}).Token
	for _, sub := range []string{"", "/events", "/lease", "/metadata"} {
		c1, b1 := tn.call("GET", "/v1/apps/a/machines/m-b"+sub, a, nil)
		c2, b2 := tn.call("GET", "/v1/apps/a/machines/m-zz"+sub, a, nil)
		if c1 != c2 || strings.ReplaceAll(string(b1), "m-b", "ID") != strings.ReplaceAll(string(b2), "m-zz", "ID") {
			t.Errorf("GET /v1/apps/a/machines/{b's machine}%s tells it from an unknown one:\n %d %s\n %d %s", sub, c1, b1, c2, b2)
		}
	}
}

// The same probe is a refused call, yet it is not in the audit log (a GET answered 404
// by the handler, not by the scope check).
func TestAttackForeignMachineProbeIsAudited(t *testing.T) {
	tn := newTenants(t)
	a := tn.token(api.CreateTokenRequest{Apps: []string{"a"}, Role: "read"})
	if code, _ := tn.call("GET", "/v1/apps/a/machines/m-b", a.Token, nil); code != http.StatusNotFound {
		t.Fatalf("probe answered %d", code)
	}
	es, _ := tn.db.ListAudit(context.Background(), store.AuditFilter{})
	for _, e := range es {
		if e.TokenID == a.ID && e.Target == "m-b" {
			return
		}
	}
	t.Errorf("a's refused read of b's machine m-b is not in the audit log: %+v", es)
}

// A token narrowed offline from the operator's would have the operator's ID, which has
// no record to revoke: such a copy is refused, and the CLI will not make one.
func TestNarrowedOperatorTokenIsRefused(t *testing.T) {
	tn := newTenants(t)
	op, _ := auth.Parse(opToken)
	ci := op.Attenuate(auth.RoleCaveat(auth.Deploy), auth.ScopeCaveat(auth.App("a")))
	if code, body := tn.call("GET", "/v1/apps/a/machines", ci, nil); code != http.StatusUnauthorized || !strings.Contains(string(body), "kiln tokens create") {
		t.Errorf("a narrowed copy of the operator's token: %d %s", code, body)
	}
	if code, _ := tn.call("GET", "/v1/apps/a/machines", opToken, nil); code != 200 {
		t.Errorf("the operator's token itself: %d", code)
	}
}
