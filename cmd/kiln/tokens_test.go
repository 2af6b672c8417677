package main_test

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/kilnhq/kiln/internal/image/imagetest"
)

// An operator hands a CI job a token for one app and project: with it the job runs the
// app's machines from the shared base image, and reaches nothing else; a narrowed copy
// made offline only reads; revoked, it opens nothing; the audit log says who did what.
func TestScopedTokensEndToEnd(t *testing.T) {
	e := newEnv(t)
	srv := startServer(t, e, freeAddr(t), "--proxy-listen", "off", "--network=false")
	defer stopOnFailure(&srv)
	dir := loadBase(t, srv)                                       // localhost/busybox:1, shared
	loadImage(t, srv, imagetest.Base(t), "localhost/other/app:1") // another tenant's
	out, errs, code := srv.kiln("", "tokens", "create", "--app", "web", "--project", "web", "--role", "deploy", "--expiry", "1h")
	tok := strings.TrimSpace(out)
	if code != 0 || !strings.HasPrefix(tok, "kiln1_") || !strings.Contains(errs, "deploy on app:web,project:web") {
		t.Fatalf("tokens create: %d %q %s", code, out, errs)
	}
	id := strings.Fields(strings.TrimPrefix(errs, "token "))[0]
	id = strings.TrimSuffix(id, ":")
	as := func(token string, args ...string) (string, string, int) {
		return srv.kiln("", append([]string{"--token", token}, args...)...)
	}

	// Its own app, from the shared base image.
	out, errs, code = as(tok, "machine", "run", "localhost/busybox:1", "--app", "web", "--", "sh", "-c", "sleep 600")
	if code != 0 {
		t.Fatalf("machine run with the app's token: %s\n%s", errs, srv.logs)
	}
	m := strings.TrimSpace(out)
	checkMetrics(t, srv, tok, "web", m)
	// Another tenant's image, app, project and the operator's routes are out of reach.
	if _, errs, code := as(tok, "machine", "run", "localhost/other/app:1", "--app", "web"); code == 0 || !strings.Contains(errs, "not found") || !strings.Contains(errs, "own namespace") {
		t.Errorf("running another namespace's image: %d %s", code, errs)
	}
	// Nor through a deploy, its plan, or another app's secrets and releases.
	flyToml := filepath.Join(t.TempDir(), "fly.toml")
	os.WriteFile(flyToml, []byte("app = \"web\"\n"), 0o644)
	for _, verb := range [][]string{{"plan"}, {"deploy", "--yes"}} {
		if _, errs, code := as(tok, append(verb, "-c", flyToml, "--image", "localhost/other/app:1")...); code == 0 || !strings.Contains(errs, "own namespace") {
			t.Errorf("%s of another namespace's image: %d %s", verb[0], code, errs)
		}
	}
	for _, args := range [][]string{{"secrets", "ls", "--app", "other"}, {"releases", "--app", "other"}, {"secrets", "set", "--app", "other", "K=v"}} {
		if _, errs, code := as(tok, args...); code == 0 || !strings.Contains(errs, "app other not found") {
			t.Errorf("%v with web's token: %d %s", args, code, errs)
		}
	}
	if _, errs, code := as(tok, "machine", "ls", "--app", "other"); code == 0 || !strings.Contains(errs, "app other not found") {
		t.Errorf("listing another app: %d %s", code, errs)
	}
	if _, errs, code := as(tok, "host", "ls"); code == 0 || !strings.Contains(errs, "operator") {
		t.Errorf("host ls with an app's token: %d %s", code, errs)
	}
	tarball := filepath.Join(e.dataDir, "mine.tar")
	imagetest.WriteDockerTarball(t, imagetest.Base(t), "localhost/other/app:2", tarball)
	if _, errs, code := as(tok, "image", "load", tarball); code == 0 || !strings.Contains(errs, "cannot push localhost/other/app") {
		t.Errorf("loading an image into another namespace: %d %s", code, errs)
	}
	// Builds: a FROM of another project's image and a tag outside the project are
	// refused when the build is submitted.
	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte("FROM localhost/other/app:1\nRUN true\n"), 0o644)
	if _, errs, code := as(tok, "build", dir, "--project", "web"); code == 0 || !strings.Contains(errs, "FROM localhost/other/app:1") {
		t.Errorf("a build FROM another project's image: %d %s", code, errs)
	}
	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte("FROM localhost/busybox:1\nRUN true\n"), 0o644)
	if _, errs, code := as(tok, "build", dir, "--project", "web", "--tag", "localhost/other/app:3"); code == 0 || !strings.Contains(errs, "outside project web") {
		t.Errorf("a build tagging into another project: %d %s", code, errs)
	}
	if _, errs, code := as(tok, "build", dir, "--project", "other"); code == 0 || !strings.Contains(errs, "not found") {
		t.Errorf("building another project: %d %s", code, errs)
	}

	// Narrowed offline to reading: it lists, and stopping is refused.
	out, errs, code = srv.e.run(tok, "tokens", "attenuate", "-", "--role", "read")
	read := strings.TrimSpace(out)
	if code != 0 || read == tok {
		t.Fatalf("attenuate: %d %s", code, errs)
	}
	if out, errs, code := as(read, "machine", "ls", "--app", "web"); code != 0 || !strings.Contains(out, m) {
		t.Errorf("machine ls with the read token: %d %s %s", code, out, errs)
	}
	if _, errs, code := as(read, "machine", "stop", m); code == 0 || !strings.Contains(errs, "needs deploy") {
		t.Errorf("stop with the read token: %d %s", code, errs)
	}
	// Fly's scheme takes the same token.
	req, _ := http.NewRequest("GET", srv.url+"/v1/apps/web/machines", nil)
	req.Header.Set("Authorization", "FlyV1 "+tok)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Errorf("FlyV1 with a scoped token: %v %v", resp, err)
	}

	// The operator lists and revokes it; both copies stop working at once.
	if out, _, _ := srv.kiln("", "tokens", "ls"); !strings.Contains(out, id) || !strings.Contains(out, "active") {
		t.Errorf("tokens ls:\n%s", out)
	}
	if _, errs, code := srv.kiln("", "tokens", "revoke", id); code != 0 {
		t.Fatalf("revoke: %s", errs)
	}
	for _, tk := range []string{tok, read} {
		if _, errs, code := as(tk, "machine", "ls", "--app", "web"); code == 0 || !strings.Contains(errs, "revoked") {
			t.Errorf("a revoked token: %d %s", code, errs)
		}
	}
	if out, _, _ := srv.kiln("", "tokens", "ls"); !strings.Contains(out, "revoked") {
		t.Errorf("tokens ls after revoke:\n%s", out)
	}
	// The audit log has the machine's creation by the token and the refusals.
	out, errs, code = srv.kiln("", "audit", "ls", "--app", "web", "--since", "1h")
	if code != 0 || !strings.Contains(out, id) || !strings.Contains(out, "POST /v1/apps/{app}/machines ") || !strings.Contains(out, " 403 ") {
		t.Errorf("audit ls:\n%s\n%s", out, errs)
	}
	if out, _, _ := srv.kiln("", "audit", "ls"); !strings.Contains(out, "other") || !strings.Contains(out, " 404 ") {
		t.Errorf("audit ls has no refused call about app other:\n%s", out)
	}
	srv.kiln("", "machine", "destroy", "-f", m)
	srv.stop(syscall.SIGTERM)
	srv = nil
}
