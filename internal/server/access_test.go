package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/auth/authtest"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// tenants is a server with two apps, a and b, each with a machine, and a real store
// keeping tokens and the audit log.
type tenants struct {
	t    *testing.T
	url  string
	db   *sqlstore.DB
	path string
}

func newTenants(t *testing.T) *tenants {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kiln.db")
	db, err := sqlstore.Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	for _, app := range []string{"a", "b"} {
		db.CreateApp(ctx, app)
		db.CreateMachine(ctx, store.Machine{ID: "m-" + app, App: app, Name: "m-" + app, State: machine.Created, Config: []byte(`{"image":"x"}`)}, machine.Event{Type: "launch", Source: "user"})
	}
	ms := machines.New(machines.Config{Store: db, Dir: t.TempDir()})
	chk := &auth.Checker{Key: authtest.Key, Tokens: db}
	srv := httptest.NewServer((&server.Server{Store: db, Node: ms, Auth: chk, Access: db, Events: db}).Handler())
	t.Cleanup(func() { srv.Close(); ms.Close() })
	return &tenants{t: t, url: srv.URL, db: db, path: path}
}

func (tn *tenants) call(method, path, token string, body any) (int, []byte) {
	tn.t.Helper()
	var rd *bytes.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	} else {
		rd = bytes.NewReader(nil)
	}
	req, _ := http.NewRequest(method, tn.url+path, rd)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tn.t.Fatal(err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	buf.ReadFrom(resp.Body)
	return resp.StatusCode, buf.Bytes()
}

// token issues a token through the API, as `kiln tokens create` does.
func (tn *tenants) token(req api.CreateTokenRequest) api.Token {
	tn.t.Helper()
	code, body := tn.call("POST", "/v1/tokens", opToken, req)
	var tok api.Token
	if code != http.StatusCreated || json.Unmarshal(body, &tok) != nil || tok.Token == "" {
		tn.t.Fatalf("creating a token %+v: %d %s", req, code, body)
	}
	return tok
}

// path fills a route's pattern with b's names.
func fill(pattern string) string {
	r := strings.NewReplacer("{app}", "b", "{id}", "m-b", "{key}", "k", "{project}", "pb", "{host}", "h", "{token}", "tok_x")
	return r.Replace(pattern)
}

// Every route about an app or project, called with a token of another tenant, answers
// 404 as if it did not exist, whatever its role; the operator's routes answer 403.
func TestCrossTenantMatrix(t *testing.T) {
	tn := newTenants(t)
	admin := tn.token(api.CreateTokenRequest{Apps: []string{"a"}, Projects: []string{"pa"}, Role: "admin"}).Token
	before, _ := tn.db.GetMachine(context.Background(), "m-b")
	checked := 0
	for _, r := range (&server.Server{}).Routes() {
		path := fill(r.Path)
		switch {
		case strings.Contains(r.Path, "{app}") || strings.Contains(r.Path, "{project}"):
			checked++
			code, body := tn.call(r.Method, path, admin, nil)
			if code != http.StatusNotFound {
				t.Errorf("%s %s with app a's token: %d %s, want 404", r.Method, path, code, body)
			}
			if strings.Contains(string(body), `"m-b"`) {
				t.Errorf("%s %s leaks b's machine: %s", r.Method, path, body)
			}
		case strings.HasPrefix(r.Path, "/v1/hosts") || r.Path == "/v1/tokens" || r.Path == "/v1/tokens/{token}":
			code, body := tn.call(r.Method, path, admin, nil)
			if code != http.StatusForbidden {
				t.Errorf("%s %s with app a's token: %d %s, want 403", r.Method, path, code, body)
			}
		}
	}
	if checked < 40 {
		t.Errorf("only %d app and project routes checked", checked)
	}
	if after, _ := tn.db.GetMachine(context.Background(), "m-b"); after.Version != before.Version || after.State != before.State {
		t.Errorf("b's machine changed: %+v → %+v", before, after)
	}
	// Lists show only what the token reaches; creating another tenant's app is refused.
	if code, body := tn.call("GET", "/v1/apps", admin, nil); code != 200 || strings.Contains(string(body), `"b"`) || !strings.Contains(string(body), `"a"`) {
		t.Errorf("app list with a's token: %d %s", code, body)
	}
	if code, body := tn.call("POST", "/v1/apps", admin, api.CreateAppRequest{AppName: "c"}); code != http.StatusForbidden {
		t.Errorf("creating app c with a's token: %d %s", code, body)
	}
	if code, _ := tn.call("POST", "/v1/apps", admin, api.CreateAppRequest{AppName: "a"}); code != http.StatusConflict {
		t.Errorf("creating its own (existing) app: %d, want 409", code)
	}
}

// A read token changes nothing: every route that would is refused with 403, and the
// machine is as it was.
func TestReadTokenChangesNothing(t *testing.T) {
	tn := newTenants(t)
	read := tn.token(api.CreateTokenRequest{Apps: []string{"b"}, Projects: []string{"pb"}, Role: "read"}).Token
	ctx := context.Background()
	before, _ := tn.db.GetMachine(ctx, "m-b")
	n := 0
	for _, r := range (&server.Server{}).Routes() {
		if r.Method == "GET" || !(strings.Contains(r.Path, "{app}") || strings.Contains(r.Path, "{project}")) {
			continue
		}
		n++
		if code, body := tn.call(r.Method, fill(r.Path), read, nil); code != http.StatusForbidden {
			t.Errorf("%s %s with a read token: %d %s, want 403", r.Method, fill(r.Path), code, body)
		}
	}
	if after, _ := tn.db.GetMachine(ctx, "m-b"); after.Version != before.Version || after.State != before.State || after.Cordoned != before.Cordoned {
		t.Errorf("the machine changed under a read token: %+v → %+v", before, after)
	}
	if apps, _ := tn.db.ListApps(ctx); len(apps) != 2 {
		t.Errorf("apps after the read token's calls: %v", apps)
	}
	if code, body := tn.call("GET", "/v1/apps/b/machines/m-b", read, nil); code != http.StatusOK {
		t.Errorf("reading its machine: %d %s", code, body)
	}
	t.Logf("%d changing routes refused", n)
}

// Expired and revoked tokens are refused; a revocation holds on this host at once; the
// store keeps no token, only hashes; an identity header is believed only from a peer.
func TestTokensExpireRevokeAndStayHashed(t *testing.T) {
	tn := newTenants(t)
	tok := tn.token(api.CreateTokenRequest{Apps: []string{"b"}, Role: "deploy", Expiry: "720h"})
	if code, _ := tn.call("GET", "/v1/apps/b/machines", tok.Token, nil); code != 200 {
		t.Fatalf("a fresh token: %d", code)
	}
	short := tn.token(api.CreateTokenRequest{Apps: []string{"b"}, Role: "deploy", Expiry: "1s"})
	time.Sleep(1100 * time.Millisecond) // the expiry is whole seconds
	if code, body := tn.call("GET", "/v1/apps/b/machines", short.Token, nil); code != http.StatusUnauthorized || !strings.Contains(string(body), "expired") {
		t.Errorf("an expired token: %d %s", code, body)
	}
	if code, body := tn.call("DELETE", "/v1/tokens/"+tok.ID, opToken, nil); code != 200 {
		t.Fatalf("revoke: %d %s", code, body)
	}
	if code, body := tn.call("GET", "/v1/apps/b/machines", tok.Token, nil); code != http.StatusUnauthorized || !strings.Contains(string(body), "revoked") {
		t.Errorf("a revoked token: %d %s", code, body)
	}
	// An altered token (a caveat dropped, the signature kept) is refused.
	p, _ := auth.Parse(tok.Token)
	if code, _ := tn.call("GET", "/v1/apps/b/machines", strings.Replace(tok.Token, tok.Token[:strings.Index(tok.Token, ".")], auth.Token{ID: p.ID}.Attenuate()[:strings.Index(auth.Token{ID: p.ID}.Attenuate(), ".")], 1), nil); code != http.StatusUnauthorized {
		t.Errorf("a token with its caveats dropped: %d", code)
	}
	// A caller cannot claim an identity over the plain API.
	req, _ := http.NewRequest("GET", tn.url+"/v1/apps", nil)
	req.Header.Set("Kiln-Identity", `{"token_id":"admin","role":4}`)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("a forged identity header without a token: %v %v", resp.StatusCode, err)
	}
	// Neither token is anywhere in the database's files.
	tn.db.Close()
	files, _ := filepath.Glob(tn.path + "*")
	for _, f := range files {
		b, _ := os.ReadFile(f)
		for _, secret := range []string{tok.Token, short.Token, opToken} {
			if bytes.Contains(b, []byte(secret)) || bytes.Contains(b, []byte(secret[len(auth.Prefix):len(auth.Prefix)+40])) {
				t.Errorf("%s holds a token in clear", f)
			}
		}
	}
}

// Calls that change something and refused calls are in the audit log, with who, what,
// the result and where from; only an admin reads it, and only its apps'.
func TestAuditRecordsChangesAndRefusals(t *testing.T) {
	tn := newTenants(t)
	a := tn.token(api.CreateTokenRequest{Apps: []string{"a"}, Role: "admin"})
	tn.call("POST", "/v1/apps/a/machines/m-a/cordon", a.Token, nil)
	tn.call("POST", "/v1/apps/b/machines/m-b/cordon", a.Token, nil) // refused: 404
	tn.call("GET", "/v1/apps/a/machines", a.Token, nil)             // a read: not recorded
	tn.call("GET", "/v1/apps", "kiln1_bogus.x", nil)                // refused: 401
	code, body := tn.call("GET", "/v1/audit", opToken, nil)
	var es []api.AuditEntry
	if code != 200 || json.Unmarshal(body, &es) != nil {
		t.Fatalf("audit: %d %s", code, body)
	}
	want := []string{
		a.ID + " a POST /v1/apps/{app}/machines/{id}/cordon m-a 200",
		a.ID + " b POST /v1/apps/{app}/machines/{id}/cordon m-b 404",
		" GET /v1/apps 401",
	}
	var got []string
	for _, e := range es {
		if e.Source != "127.0.0.1" || e.At.IsZero() {
			t.Errorf("entry without source or time: %+v", e)
		}
		if e.Action == "POST /v1/tokens" {
			continue
		}
		got = append(got, strings.TrimSpace(strings.Join(strings.Fields(e.TokenID+" "+e.App+" "+e.Action+" "+e.Target+" "+strconv.Itoa(e.Result)), " ")))
	}
	for i := range want {
		want[i] = strings.TrimSpace(strings.Join(strings.Fields(want[i]), " "))
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("audit entries:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// a's admin reads a's entries only; a deploy token reads none.
	code, body = tn.call("GET", "/v1/audit", a.Token, nil)
	if code != 200 || strings.Contains(string(body), "m-b") || !strings.Contains(string(body), "m-a") {
		t.Errorf("audit read by a's admin: %d %s", code, body)
	}
	deploy := tn.token(api.CreateTokenRequest{Apps: []string{"a"}, Role: "deploy"})
	if code, _ := tn.call("GET", "/v1/audit", deploy.Token, nil); code != http.StatusForbidden {
		t.Errorf("audit read by a deploy token: %d", code)
	}
	// No route edits it.
	for _, r := range (&server.Server{}).Routes() {
		if strings.HasPrefix(r.Path, "/v1/audit") && r.Method != "GET" {
			t.Errorf("%s %s changes the audit log", r.Method, r.Path)
		}
	}
}
