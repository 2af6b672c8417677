package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/auth/authtest"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// The committed OpenAPI document and the handlers describe the same routes.
func TestOpenAPIMatchesRoutes(t *testing.T) {
	var doc struct {
		OpenAPI string                                `json:"openapi"`
		Paths   map[string]map[string]json.RawMessage `json:"paths"`
	}
	if err := json.Unmarshal(api.OpenAPI, &doc); err != nil {
		t.Fatalf("openapi.json: %v", err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Errorf("openapi version %q", doc.OpenAPI)
	}
	var documented, served []string
	for path, ops := range doc.Paths {
		for method := range ops {
			documented = append(documented, strings.ToUpper(method)+" "+path)
		}
	}
	for _, r := range (&server.Server{}).Routes() {
		served = append(served, r.Method+" "+r.Path)
	}
	sort.Strings(documented)
	sort.Strings(served)
	if strings.Join(documented, "\n") != strings.Join(served, "\n") {
		t.Errorf("document and handlers differ\ndocumented:\n%s\nserved:\n%s", strings.Join(documented, "\n"), strings.Join(served, "\n"))
	}
}

func TestAuth(t *testing.T) {
	srv := httptest.NewServer((&server.Server{Auth: opAuth}).Handler())
	defer srv.Close()
	for _, tc := range []struct {
		path, auth string
		code       int
	}{
		{"/v1/apps", "", 401},
		{"/v1/apps", "Bearer wrong", 401},
		{"/v1/apps/web/machines", "Basic c2VjcmV0", 401},
		{"/v1/openapi.json", "", 200},
		{"/v2/nothing", "Bearer " + opToken, 404},
	} {
		req, _ := http.NewRequest("GET", srv.URL+tc.path, nil)
		if tc.auth != "" {
			req.Header.Set("Authorization", tc.auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var e api.Error
		json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != tc.code {
			t.Errorf("%s with %q: %d, want %d", tc.path, tc.auth, resp.StatusCode, tc.code)
		}
		if tc.code == 401 && !strings.Contains(e.Error, "admin-token") {
			t.Errorf("401 body %q does not say where the token is", e.Error)
		}
	}
}

// A lease cannot be stepped around through a metadata key named like the lease route.
func TestLeaseHoldsForEveryChange(t *testing.T) {
	srv := oneMachine(t)
	do := func(method, path, body, nonce string) int {
		req, _ := http.NewRequest(method, srv.URL+"/v1/apps/web/machines/m1"+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+opToken)
		if nonce != "" {
			req.Header.Set(api.LeaseHeader, nonce)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := do("POST", "/lease", `{"ttl":60}`, ""); code != 201 {
		t.Fatalf("lease: %d", code)
	}
	// What changes the machine's config or state needs the nonce, as with Fly; a
	// metadata key named like a guarded route is still metadata, which Fly's client sets
	// without one.
	for _, c := range []struct{ method, path, body string }{
		{"POST", "/cordon", ""}, {"POST", "/uncordon", ""}, {"POST", "/start", ""}, {"POST", "/stop", ""},
		{"POST", "/restart", ""}, {"POST", "/suspend", ""}, {"POST", "", `{"config":{"image":"x"}}`}, {"DELETE", "", ""},
	} {
		if code := do(c.method, c.path, c.body, ""); code != 409 {
			t.Errorf("%s %s without the nonce under a lease: %d, want 409", c.method, c.path, code)
		}
	}
	for _, p := range []string{"/metadata/lease", "/metadata/a%2Fstop"} {
		if code := do("POST", p, `{"value":"v"}`, ""); code != 204 {
			t.Errorf("POST %s under a lease: %d, want 204", p, code)
		}
	}
}

// kiln's own machines (builders, app _builders) are not the API's: the app is not
// listed, and nothing under it can be read or changed, whatever the store holds.
func TestInternalAppsAreHidden(t *testing.T) {
	ctx := context.Background()
	db, err := sqlstore.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.CreateApp(ctx, "web")
	db.CreateApp(ctx, "_builders")
	db.CreateMachine(ctx, store.Machine{ID: "builder-shop", App: "_builders", Name: "shop", State: machine.Created, Config: []byte(`{}`)}, machine.Event{Type: "launch", Source: "kiln"})
	srv := httptest.NewServer((&server.Server{Store: db, Auth: opAuth}).Handler())
	defer srv.Close()
	do := func(method, path string) int {
		req, _ := http.NewRequest(method, srv.URL+path, nil)
		req.Header.Set("Authorization", "Bearer "+opToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	req, _ := http.NewRequest("GET", srv.URL+"/v1/apps", nil)
	req.Header.Set("Authorization", "Bearer "+opToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var list api.AppList
	json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if apps := list.Apps; len(apps) != 1 || apps[0].Name != "web" || list.TotalApps != 1 {
		t.Fatalf("apps listed: %+v, want only web", apps)
	}
	for _, c := range []struct{ method, path string }{
		{"GET", "/v1/apps/_builders"},
		{"GET", "/v1/apps/_builders/machines"},
		{"GET", "/v1/apps/_builders/machines/builder-shop"},
		{"POST", "/v1/apps/_builders/machines/builder-shop/stop"},
		{"DELETE", "/v1/apps/_builders/machines/builder-shop"},
	} {
		if code := do(c.method, c.path); code != 404 {
			t.Errorf("%s %s: %d, want 404", c.method, c.path, code)
		}
	}
}

// Wait takes Fly's "settled" for any resting state, and several states at once.
func TestWaitSettled(t *testing.T) {
	srv := oneMachine(t)
	for q, want := range map[string]int{"state=settled": 200, "state=stopped&state=created": 200, "state=stopped,created&version=1": 200,
		"state=nonsense": 400, "state=started&timeout=1": 408, "state=created&version=2": 404} {
		req, _ := http.NewRequest("GET", srv.URL+"/v1/apps/web/machines/m1/wait?"+q, nil)
		req.Header.Set("Authorization", "Bearer "+opToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var body api.WaitResponse
		json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if resp.StatusCode != want || want == 200 && body.State != "created" {
			t.Errorf("wait?%s: %d %+v, want %d", q, resp.StatusCode, body, want)
		}
	}
}

// A bulk metadata update is bounded by what a machine can hold, before the store sees it.
func TestBulkMetadataIsBounded(t *testing.T) {
	srv := oneMachine(t)
	put := func(n int) int {
		md := map[string]*string{}
		for i := range n {
			md[fmt.Sprintf("k%d", i)] = nil
		}
		body, _ := json.Marshal(api.MetadataUpdate{Metadata: md})
		req, _ := http.NewRequest("PUT", srv.URL+"/v1/apps/web/machines/m1/metadata", bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+opToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := put(2 * machine.MaxMetadataKeys); code != 204 {
		t.Errorf("removing %d keys: %d, want 204", 2*machine.MaxMetadataKeys, code)
	}
	if code := put(20000); code != 400 {
		t.Errorf("20000 keys in one update: %d, want 400", code)
	}
}

// oneMachine serves the API (token t) over a fresh store holding app web with one
// created machine, m1, and no VM runtime.
func oneMachine(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(oneMachineAPI(t, nil).Handler())
	t.Cleanup(srv.Close)
	return srv
}

// oneMachineAPI is oneMachine's server, logging to log.
func oneMachineAPI(t *testing.T, log *slog.Logger) *server.Server {
	t.Helper()
	ctx := context.Background()
	db, err := sqlstore.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	db.CreateApp(ctx, "web")
	db.CreateMachine(ctx, store.Machine{ID: "m1", App: "web", Name: "m1", State: machine.Created, Config: []byte(`{"image":"x"}`)}, machine.Event{Type: "launch", Source: "user"})
	ms := machines.New(machines.Config{Store: db, Dir: t.TempDir()})
	t.Cleanup(ms.Close)
	return &server.Server{Store: db, Node: ms, Auth: opAuth, Log: log}
}

// opAuth checks tokens; opToken is the operator's.
var opAuth, opToken = authtest.Operator()
