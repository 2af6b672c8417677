package registry_test

// Tests from the attacker's review of issue 13: each failed while the hole it names was open.

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/auth/authtest"
	"github.com/kilnhq/kiln/internal/registry"
	"github.com/kilnhq/kiln/internal/store"
)

// The mount check reads ?from= from the query; distribution reads it with
// r.FormValue, which also takes it from a form-encoded POST body. So a token for pa
// mounts pb's blob into its own repository and reads it.
func TestAttackMountFromInFormBody(t *testing.T) {
	ctx := context.Background()
	chk, op := authtest.Operator()
	srv := httptest.NewServer(registry.Handler(ctx, t.TempDir(), registry.Access{Auth: chk}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	pa := authtest.Issue(chk, "tok_pa", auth.RoleCaveat(auth.Deploy), auth.ScopeCaveat(auth.Project("pa")))
	secret, _ := random.Image(512, 1)
	ref, _ := name.ParseReference(host+"/pb/secret:1", name.Insecure)
	if err := remote.Write(ref, secret, remote.WithAuth(&authn.Basic{Username: "kiln", Password: op})); err != nil {
		t.Fatal(err)
	}
	layers, _ := secret.Layers()
	d, _ := layers[0].Digest()
	req, _ := http.NewRequest("POST", srv.URL+"/v2/pa/loot/blobs/uploads/?mount="+d.String(), strings.NewReader("from=pb/secret"))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth("kiln", pa)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusCreated {
		t.Errorf("pa mounted pb's layer %s into pa/loot (201): from= in the body is not checked", d)
	}
	req, _ = http.NewRequest("GET", srv.URL+"/v2/pa/loot/blobs/"+d.String(), nil)
	req.SetBasicAuth("kiln", pa)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		t.Errorf("pa reads pb's layer through pa/loot: %d bytes", len(b))
	}
}

type auditSink struct {
	store.Audit // methods the test does not call
	mu          sync.Mutex
	es          []store.AuditEntry
}

func (s *auditSink) AddAudit(_ context.Context, e store.AuditEntry) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.es = append(s.es, e)
	return nil
}

// A refused registry call's entry takes its repository (target and app) from the path
// unbounded (only the action is cut to 200): with no token at all, ~60 KiB a row.
func TestAttackRegistryAuditEntryIsBounded(t *testing.T) {
	ctx := context.Background()
	chk, _ := authtest.Operator()
	sink := &auditSink{}
	srv := httptest.NewServer(registry.Handler(ctx, t.TempDir(), registry.Access{Auth: chk, Audit: sink}))
	defer srv.Close()
	long := strings.Repeat("x", 30<<10)
	req, _ := http.NewRequest("POST", srv.URL+"/v2/"+long+"/"+long+"/blobs/uploads/", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	sink.mu.Lock()
	defer sink.mu.Unlock()
	if len(sink.es) == 0 {
		t.Fatal("the refusal was not recorded")
	}
	for _, e := range sink.es {
		if n := len(e.App) + len(e.Target) + len(e.Action); n > 2048 {
			t.Errorf("registry audit entry (status %d) holds %d bytes from the path", e.Result, n)
		}
	}
}
