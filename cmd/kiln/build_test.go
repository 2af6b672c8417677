package main_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/testutil"
)

// loadBase loads the busybox base image as localhost/busybox:1 and returns an empty
// directory for a build context.
func loadBase(t *testing.T, srv *kilnServer) string {
	t.Helper()
	loadImage(t, srv, imagetest.Base(t), "localhost/busybox:1")
	dir := filepath.Join(srv.e.dataDir, "app")
	os.MkdirAll(dir, 0o755)
	return dir
}

// loadImage loads img into the server's registry as ref with `kiln image load`.
func loadImage(t *testing.T, srv *kilnServer, img v1.Image, ref string) {
	t.Helper()
	tarball := filepath.Join(srv.e.dataDir, "image.tar")
	imagetest.WriteDockerTarball(t, img, ref, tarball)
	if _, errs, code := srv.kiln("", "image", "load", tarball); code != 0 {
		t.Fatalf("image load %s: %s", ref, errs)
	}
}

// A project is built with `kiln build` from a context with a .dockerignore, pushed to
// kiln's registry and run as a machine; the second build after a one-line change reports
// cached steps.
func TestBuildEndToEnd(t *testing.T) {
	e := newEnv(t)
	addr := freeAddr(t)
	srv := startServer(t, e, addr, "--proxy-listen", freeAddr(t), "--build-cache-size", "4G", "--builder-memory", "1024", "--build-git-allow-file")
	defer stopOnFailure(&srv)
	dir := loadBase(t, srv)
	write := func(name, body string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("Dockerfile", `FROM localhost/busybox:1 AS build
RUN mkdir /deps && echo installed > /deps/lock
COPY . /src
RUN test ! -e /src/secret.env && test ! -e /src/notes.txt && echo ignored-files-absent
RUN sh -c 'cat /src/main.txt > /out'

FROM localhost/busybox:1
COPY --from=build /out /out
CMD ["sh", "-c", "cat /out; sleep 600"]
`)
	write("main.txt", "version one\n")
	write("secret.env", "TOKEN=do-not-send\n")
	write("notes.txt", "notes\n")
	write(".dockerignore", "*.env\nnotes.txt\n")

	out, errs, code := srv.kiln("", "build", dir, "--project", "shop", "--tag", "localhost/shop/web:v2")
	if code != 0 || !strings.Contains(out, "localhost/shop/web:v2") || !strings.Contains(out, "ignored-files-absent") {
		t.Fatalf("kiln build: exit %d\n%s\n%s\n%s", code, out, errs, srv.logs)
	}
	ctx := context.Background()
	cl := client.New(srv.url, readToken(t, filepath.Join(e.dataDir, "admin-token")))
	bs, err := cl.ListBuilds(ctx, "shop")
	if err != nil || len(bs) != 1 || bs[0].State != "succeeded" {
		t.Fatalf("builds: %+v %v", bs, err)
	}
	first := bs[0]

	// Runs as a machine at once.
	out, errs, code = srv.kiln("", "machine", "run", "localhost/shop/web:v2", "--app", "shop")
	if code != 0 {
		t.Fatalf("machine run: %s", errs)
	}
	id := strings.TrimSpace(out)
	if err := cl.Wait(ctx, "shop", id, "started", 90*time.Second); err != nil {
		t.Fatal(err)
	}
	res, err := cl.Exec(ctx, "shop", id, []string{"cat", "/out"}, "", 30*time.Second)
	if err != nil || res.Stdout != "version one\n" {
		t.Fatalf("the built image runs: %+v %v", res, err)
	}
	srv.kiln("", "machine", "destroy", "-f", id)

	// One-line change: the steps before it are cached.
	write("main.txt", "version two\n")
	out, errs, code = srv.kiln("", "build", dir, "--project", "shop", "--tag", "localhost/shop/web:v3")
	if code != 0 {
		t.Fatalf("second build: %s\n%s", out, errs)
	}
	bs, _ = cl.ListBuilds(ctx, "shop")
	second := bs[0]
	if second.CachedSteps == 0 || second.BuilderReady != 0 {
		t.Errorf("second build: %d of %d steps cached, builder ready %d ms; want cached steps on a warm builder", second.CachedSteps, second.TotalSteps, second.BuilderReady)
	}
	if !strings.Contains(errs, "steps cached") {
		t.Errorf("the CLI does not report cached steps: %s", errs)
	}
	t.Logf("first build %d ms (builder %d ms), second %d ms with %d/%d cached", first.DurationMS, first.BuilderReady, second.DurationMS, second.CachedSteps, second.TotalSteps)

	// kiln deploy builds the fly.toml's [build] in the project's builder and deploys the
	// image by its digest.
	write("fly.toml", "app = \"shop\"\n\n[build]\n  dockerfile = \"Dockerfile\"\n\n[kiln]\n  project = \"shop\"\n")
	deploy := srv.e.cmd("--api-url", srv.url, "deploy", "--yes")
	deploy.Dir = dir
	if out, err := deploy.CombinedOutput(); err != nil || !strings.Contains(string(out), "release 1 succeeded") || !strings.Contains(string(out), "localhost/shop/build@sha256:") {
		t.Fatalf("kiln deploy with a build: %v\n%s\n%s", err, out, srv.logs)
	}
	ms, _ := cl.ListMachines(ctx, "shop")
	for _, m := range ms {
		if m.State != "started" {
			continue
		}
		if !strings.Contains(m.Config.Image, "@sha256:") {
			t.Errorf("the deployed machine runs %s, not the build's digest", m.Config.Image)
		}
		if res, err := cl.Exec(ctx, "shop", m.ID, []string{"cat", "/out"}, "", 30*time.Second); err != nil || res.Stdout != "version two\n" {
			t.Fatalf("the deployed build: %+v %v", res, err)
		}
	}
	if _, errs, code := srv.kiln("", "scale", "count", "0", "--app", "shop"); code != 0 {
		t.Fatalf("scale count 0: %s", errs)
	}

	if out, errs, code := srv.kiln("", "build", "cache", "show", "--project", "shop"); code != 0 || !strings.Contains(out, "builder      running") || !strings.Contains(out, "used ") {
		t.Errorf("build cache show: %d %s %s", code, out, errs)
	}

	// From a git repository, cloned by the server.
	repo := testutil.TempDir(t)
	os.Chmod(repo, 0o755) // the server's git fetches as an unprivileged user
	os.WriteFile(filepath.Join(repo, "Dockerfile"), []byte("FROM localhost/busybox:1\nRUN echo from-git > /g\n"), 0o644)
	for _, args := range [][]string{{"init", "-q", "-b", "main"}, {"add", "."}, {"-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x"}} {
		if out, err := exec.Command("git", append([]string{"-C", repo}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v %s", args, err, out)
		}
	}
	if out, errs, code := srv.kiln("", "build", "--git", "file://"+repo, "--git-ref", "main", "--project", "shop", "--tag", "localhost/shop/git:1"); code != 0 || !strings.Contains(out, "localhost/shop/git:1") {
		t.Errorf("kiln build --git: %d %s %s", code, out, errs)
	}

	// Logs afterwards; bad input before any VM.
	out, _, code = srv.kiln("", "build", "logs", first.ID, "--project", "shop")
	if code != 0 || !strings.Contains(out, "ignored-files-absent") {
		t.Errorf("build logs: %d %s", code, out)
	}
	os.Remove(filepath.Join(dir, "Dockerfile"))
	if _, errs, code := srv.kiln("", "build", dir, "--project", "shop"); code != 2 || !strings.Contains(errs, "no Dockerfile at "+filepath.Join(dir, "Dockerfile")) {
		t.Errorf("missing Dockerfile: exit %d: %s", code, errs)
	}
	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte("FROM localhost/busybox:1\n"), 0o644)
	if _, errs, code := srv.kiln("", "build", dir, "--project", "Bad_Name"); code == 0 || !strings.Contains(errs, "project name") {
		t.Errorf("bad project: exit %d: %s", code, errs)
	}
	// The builder outlives the server (it is adopted at the next start) until it is
	// removed; its cache stays.
	if out, errs, code := srv.kiln("", "build", "builder", "rm", "--project", "shop"); code != 0 || !strings.Contains(out, "cache stays") {
		t.Errorf("build builder rm: exit %d: %s%s", code, out, errs)
	}
	if _, errs, code := srv.kiln("", "build", "builder", "rm", "--project", "shop"); code != 0 {
		t.Errorf("build builder rm of a removed builder (nothing to do): exit %d: %s", code, errs)
	}
	if _, errs, code := srv.kiln("", "build", "builder", "rm", "--project", "never"); code != 1 || !strings.Contains(errs, "has no builder") {
		t.Errorf("build builder rm of a project that never built: exit %d: %s", code, errs)
	}
	if _, err := os.Stat(filepath.Join(e.dataDir, "builders", "shop", "cache.ext4")); err != nil {
		t.Errorf("the cache volume went with its builder: %v", err)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}

// kill -9 of the server mid-build: the restarted server queues the build again (an
// infrastructure failure, recorded as a retry) and it finishes on a new builder.
func TestBuildSurvivesServerRestart(t *testing.T) {
	e := newEnv(t)
	addr := freeAddr(t)
	args := []string{"--proxy-listen", "off", "--network=false", "--build-cache-size", "4G", "--builder-memory", "1024"}
	srv := startServer(t, e, addr, args...)
	defer stopOnFailure(&srv)
	dir := loadBase(t, srv)
	// The first step finishes before kiln is killed: after the restart it must come from
	// the cache, because the builder (with its cache) is adopted rather than replaced.
	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte("FROM localhost/busybox:1\nRUN echo first > /first\nRUN echo slow-step-started; sleep 5; echo done > /done\n"), 0o644)
	out, errs, code := srv.kiln("", "build", dir, "--project", "shop", "--detach")
	if code != 0 {
		t.Fatalf("kiln build --detach: %s", errs)
	}
	id := strings.TrimSpace(out)
	ctx := context.Background()
	cl := client.New(srv.url, readToken(t, filepath.Join(e.dataDir, "admin-token")))
	waitFor(t, func() bool {
		var seen bool
		cl.BuildLogs(ctx, "shop", id, false, func(l string) { seen = seen || strings.Contains(l, "slow-step-started") })
		return seen
	}, "the slow step to start")
	srv.stop(syscall.SIGKILL)
	srv = startServer(t, e, addr, args...)
	cl = client.New(srv.url, readToken(t, filepath.Join(e.dataDir, "admin-token")))
	b, err := cl.BuildLogs(ctx, "shop", id, true, func(string) {})
	if err != nil {
		t.Fatal(err)
	}
	if b.State != "succeeded" || len(b.Retries) != 1 || !strings.Contains(b.Retries[0], "kiln stopped") ||
		b.Builder != "warm" || b.CachedSteps < 1 {
		log, _, _ := srv.kiln("", "build", "logs", id, "--project", "shop")
		t.Fatalf("after the restart: %s %s retries %q, builder %s, %d of %d steps cached\n%s\n%s", b.State, b.Error, b.Retries,
			b.Builder, b.CachedSteps, b.TotalSteps, log, srv.logs)
	}
	if _, errs, code := srv.kiln("", "build", "builder", "rm", "--project", "shop"); code != 0 {
		t.Errorf("build builder rm: %s", errs)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}

// Most real Dockerfiles name their base through an ARG. kiln expands it as BuildKit does
// (with --build-arg values), so the base reaches the builder, and the rest of a real
// Dockerfile works with it: a heredoc RUN, a secret, COPY --chmod, USER, --target and
// .dockerignore.
func TestBuildFromArg(t *testing.T) {
	e := newEnv(t)
	srv := startServer(t, e, freeAddr(t), "--proxy-listen", "off", "--network=false", "--build-cache-size", "4G", "--builder-memory", "1024")
	defer stopOnFailure(&srv)
	dir := loadBase(t, srv)
	write := func(name, body string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("Dockerfile", `ARG REGISTRY=localhost
ARG BASE=${REGISTRY}/nothing:0
FROM ${BASE} AS build
RUN <<EOT
echo heredoc-ran
echo built > /built
EOT
RUN --mount=type=secret,id=tok test "$(wc -c < /run/secrets/tok)" -eq 6 && echo secret-seen
COPY --chmod=0750 run.sh /run.sh
RUN test ! -e /ctx/secret.env && echo mode-$(stat -c %a /run.sh)

FROM build AS prod
USER 65534:65534
RUN echo uid-$(id -u)

FROM prod AS never
RUN false
`)
	write("run.sh", "#!/bin/sh\necho hi\n")
	write("secret.env", "TOKEN=do-not-send\n")
	write(".dockerignore", "*.env\n")
	secret := filepath.Join(e.dataDir, "tok")
	os.WriteFile(secret, []byte("s3cret"), 0o600)
	out, errs, code := srv.kiln("", "build", dir, "--project", "shop", "--tag", "localhost/shop/arg:1", "--target", "prod",
		"--build-arg", "BASE=localhost/busybox:1", "--secret", "id=tok,src="+secret)
	if code != 0 {
		t.Fatalf("kiln build: exit %d\n%s\n%s\n%s", code, out, errs, srv.logs)
	}
	for _, want := range []string{"heredoc-ran", "secret-seen", "mode-750", "uid-65534", "localhost/shop/arg:1"} {
		if !strings.Contains(out+errs, want) {
			t.Errorf("the build's output lacks %q:\n%s\n%s", want, out, errs)
		}
	}
	if strings.Contains(out+errs, "s3cret") {
		t.Errorf("the secret's value is in the build's output")
	}
	// The ARG's default names an image that does not exist: without --build-arg the
	// build is refused at submission, naming the expanded reference.
	if _, errs, code := srv.kiln("", "build", dir, "--project", "shop", "--target", "prod"); code == 0 || !strings.Contains(errs, "localhost/nothing:0") {
		t.Errorf("a FROM whose ARG names a missing image: %d %s", code, errs)
	}
	if _, errs, code := srv.kiln("", "build", "builder", "rm", "--project", "shop"); code != 0 {
		t.Errorf("build builder rm: %s", errs)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}
