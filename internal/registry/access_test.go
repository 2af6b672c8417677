package registry_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/auth/authtest"
	"github.com/kilnhq/kiln/internal/registry"
)

// A project's token pushes and pulls its own namespace, pulls shared images, and
// reaches nothing of another project's, with go-containerregistry as the client.
func TestRegistryNamespaces(t *testing.T) {
	ctx := context.Background()
	chk, op := authtest.Operator()
	srv := httptest.NewServer(registry.Handler(ctx, t.TempDir(), registry.Access{Auth: chk, Rules: registry.Rules{Shared: []string{"library"}}}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	pa := authtest.Issue(chk, "tok_pa", auth.RoleCaveat(auth.Deploy), auth.ScopeCaveat(auth.Project("pa")))
	img, err := random.Image(512, 1)
	if err != nil {
		t.Fatal(err)
	}
	// Each push sends a new image: one the registry has already is not written again.
	push := func(tok, repo string) error {
		ref, _ := name.ParseReference(host+"/"+repo, name.Insecure)
		fresh, err := random.Image(512, 1)
		if err != nil {
			t.Fatal(err)
		}
		return remote.Write(ref, fresh, remote.WithAuth(&authn.Basic{Username: "kiln", Password: tok}))
	}
	pull := func(tok, repo string) error {
		ref, _ := name.ParseReference(host+"/"+repo, name.Insecure)
		_, err := remote.Image(ref, remote.WithAuth(&authn.Basic{Username: "kiln", Password: tok}))
		return err
	}
	if ref, _ := name.ParseReference(host+"/pb/web:1", name.Insecure); remote.Write(ref, img, remote.WithAuth(&authn.Basic{Username: "kiln", Password: op})) != nil {
		t.Fatal("the operator pushing pb/web:1")
	}
	for _, repo := range []string{"base:1", "library/alpine:1"} {
		if err := push(op, repo); err != nil {
			t.Fatalf("the operator pushing %s: %v", repo, err)
		}
	}
	status := func(err error) int {
		var te *transport.Error
		if errors.As(err, &te) {
			return te.StatusCode
		}
		return 0
	}
	for _, c := range []struct {
		what string
		err  error
		want int // 0: allowed
	}{
		{"push its own", push(pa, "pa/web:1"), 0},
		{"pull its own", pull(pa, "pa/web:1"), 0},
		{"pull an unnamespaced shared image", pull(pa, "base:1"), 0},
		{"pull a shared namespace", pull(pa, "library/alpine:1"), 0},
		{"pull another project's", pull(pa, "pb/web:1"), http.StatusNotFound},
		{"push another project's", push(pa, "pb/web:2"), http.StatusForbidden},
		{"push over a shared image", push(pa, "base:1"), http.StatusForbidden},
		{"push into a shared namespace", push(pa, "library/alpine:2"), http.StatusForbidden},
		{"pull with no token", pull("", "base:1"), http.StatusUnauthorized},
	} {
		if got := status(c.err); got != c.want || c.want == 0 && c.err != nil {
			t.Errorf("%s: %v (status %d), want %d", c.what, c.err, got, c.want)
		}
	}
	// A cross-repository mount reads the other repository: refused like a pull.
	d, _ := img.Digest()
	req, _ := http.NewRequest("POST", srv.URL+"/v2/pa/web/blobs/uploads/?mount="+d.String()+"&from=pb/web", nil)
	req.SetBasicAuth("kiln", pa)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusNotFound {
		t.Errorf("mounting pb's blob into pa: %v %v, want 404", resp.StatusCode, err)
	}
	// A repository named so that its path holds another route's word is read whole: pb's
	// repository pb/manifests/x is pb's, not the shared "pb".
	if ref, _ := name.ParseReference(host+"/pb/manifests/x:1", name.Insecure); remote.Write(ref, img, remote.WithAuth(&authn.Basic{Username: "kiln", Password: op})) != nil {
		t.Fatal("the operator pushing pb/manifests/x:1")
	}
	for _, path := range []string{"/v2/pb/manifests/x/tags/list", "/v2/pb/manifests/x/manifests/1"} {
		req, _ := http.NewRequest("GET", srv.URL+path, nil)
		req.SetBasicAuth("kiln", pa)
		if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s with pa's token: %v %v, want 404", path, resp.StatusCode, err)
		}
	}
	// Listing every repository is the operator's.
	req, _ = http.NewRequest("GET", srv.URL+"/v2/_catalog", nil)
	req.SetBasicAuth("kiln", pa)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusForbidden {
		t.Errorf("the catalog with a project's token: %v %v", resp.StatusCode, err)
	}
}
