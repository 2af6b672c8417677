package build_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth/authtest"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/machines"
	kilnregistry "github.com/kilnhq/kiln/internal/registry"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/testutil"
	"github.com/kilnhq/kiln/internal/vmm/qemu"
)

func TestMain(m *testing.M) {
	os.Exit(testutil.Finish(m.Run()))
}

// registry stands in for kiln's registry in these tests: it serves the busybox base
// image and keeps what builds push. (The server's end-to-end test uses the real one.)
type registry struct {
	mu      sync.Mutex
	base    v1.Image
	pushed  map[string]v1.Image
	dir     string
	deleted []string
	pushes  int
}

func (r *registry) Delete(_ context.Context, ref string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.deleted = append(r.deleted, ref)
	return nil
}

func (r *registry) Resolve(_ context.Context, ref string) (v1.Image, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ref == "localhost/busybox:1" {
		return r.base, nil
	}
	if img, ok := r.pushed[ref]; ok {
		return img, nil
	}
	return nil, errdefs.New(errdefs.ErrNotFound, "no image %s", ref)
}

func (r *registry) Push(_ context.Context, img v1.Image, refs ...string) (string, []string, error) {
	// Keep a copy: the service keeps only its project's last image.
	r.mu.Lock()
	r.pushes++
	cp := filepath.Join(r.dir, fmt.Sprintf("pushed-%d", r.pushes))
	r.mu.Unlock()
	p, err := layout.Write(cp, empty.Index)
	if err != nil {
		return "", nil, err
	}
	if err := p.AppendImage(img); err != nil {
		return "", nil, err
	}
	dg, err := img.Digest()
	if err != nil {
		return "", nil, err
	}
	if img, err = p.Image(dg); err != nil {
		return "", nil, err
	}
	r.mu.Lock()
	for _, t := range refs {
		r.pushed[t] = img
	}
	r.mu.Unlock()
	return dg.String(), refs, nil
}

// fileIn reads a file from an image's layers, the top layer winning.
func fileIn(t *testing.T, img v1.Image, name string) (string, bool) {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err != nil {
			return "", false
		}
		if strings.TrimPrefix(h.Name, "./") == name {
			b, _ := io.ReadAll(tr)
			return string(b), true
		}
	}
}

// ctxTar packs files (name → content) as a build context.
func ctxTar(files map[string]string) io.Reader {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for name, body := range files {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg})
		tw.Write([]byte(body))
	}
	tw.Close()
	return &buf
}

type harness struct {
	svc *build.Service
	reg *registry
	dir string
}

func newHarness(t *testing.T, opts ...func(*build.Service)) *harness {
	rootfs := testutil.BuilderRootfs(t)
	rt := testutil.Runtime(t, &qemu.Driver{})
	dir := testutil.TempDir(t)
	db, err := sqlstore.Open(context.Background(), filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	reg := &registry{base: imagetest.Base(t), pushed: map[string]v1.Image{}, dir: dir}
	bs := &build.Builders{RT: rt, Rootfs: rootfs, Dir: filepath.Join(dir, "builders"), CacheBytes: 4 << 30, KeepBytes: 2 << 30,
		CPUs: 2, MemoryMiB: 1024, Idle: time.Hour, Log: os.Stderr}
	// Builders are machines: the machines' supervisor runs them.
	ms := machines.New(machines.Config{Store: db, VMs: rt, Dir: filepath.Join(dir, "machines"), Log: slog.Default(),
		Internal: map[string]machines.Internal{build.BuildersApp: bs}})
	bs.Use(ms)
	svc := &build.Service{Store: db, Builders: bs, Bases: &build.Bases{Dir: filepath.Join(dir, "bases")}, Images: reg,
		Dir: filepath.Join(dir, "builds"), MaxContextBytes: 64 << 20, MaxLogBytes: 1 << 20, MaxAttempts: 3,
		Backoff: 100 * time.Millisecond, MaxConcurrent: 2, Log: slog.Default()}
	for _, o := range opts {
		o(svc)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { svc.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		bs.Close(context.Background())
		ms.Close()
	})
	return &harness{svc: svc, reg: reg, dir: dir}
}

func (h *harness) wait(t *testing.T, id string) api.Build {
	t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for time.Now().Before(deadline) {
		b, err := h.svc.Get(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if build.Terminal(b.State) {
			return b
		}
		time.Sleep(200 * time.Millisecond)
	}
	log, _ := os.ReadFile(h.svc.LogPath(id))
	// The builder machines' stored output (buildkitd's) says what the builder did.
	var builders []string
	outs, _ := filepath.Glob(filepath.Join(h.dir, "machines", "*", "output.log"))
	for _, f := range outs {
		b, _ := os.ReadFile(f)
		if len(b) > 4000 {
			b = b[len(b)-4000:]
		}
		builders = append(builders, f+":\n"+string(b))
	}
	t.Fatalf("build %s did not end:\n%s\nbuilders' output:\n%s", id, log, strings.Join(builders, "\n"))
	return api.Build{}
}

const appDockerfile = `FROM localhost/busybox:1 AS base
RUN echo base > /base.txt

FROM base AS build
COPY main.txt /src/main.txt
RUN --mount=type=cache,target=/cache sh -c 'echo run >> /cache/runs; wc -l < /cache/runs > /src/runs; cat /src/main.txt > /src/out'

FROM localhost/busybox:1
COPY --from=build /src/out /out
COPY --from=build /src/runs /runs
`

func TestBuildCachesAndRuns(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	submit := func(main string) api.Build {
		b, err := h.svc.Submit(ctx, "shop", api.BuildSpec{Tags: []string{"localhost/shop/web:v1"}},
			ctxTar(map[string]string{"Dockerfile": appDockerfile, "main.txt": main}), nil)
		if err != nil {
			t.Fatal(err)
		}
		b = h.wait(t, b.ID)
		if b.State != build.Succeeded {
			log, _ := os.ReadFile(h.svc.LogPath(b.ID))
			t.Fatalf("build %s: %s %s\n%s", b.ID, b.State, b.Error, log)
		}
		return b
	}
	first := submit("one\n")
	img, _ := h.reg.Resolve(ctx, "localhost/shop/web:v1")
	if out, ok := fileIn(t, img, "out"); !ok || out != "one\n" {
		t.Fatalf("/out in the image: %q %v", out, ok)
	}
	second := submit("two\n")
	img, _ = h.reg.Resolve(ctx, "localhost/shop/web:v1")
	if out, _ := fileIn(t, img, "out"); out != "two\n" {
		t.Fatalf("/out after the change: %q", out)
	}
	// The steps before the change come from the cache; the cache mount kept its file.
	if second.CachedSteps == 0 || second.CachedSteps >= second.TotalSteps {
		t.Errorf("second build: %d of %d steps cached; want the steps before the change", second.CachedSteps, second.TotalSteps)
	}
	if runs, _ := fileIn(t, img, "runs"); strings.TrimSpace(runs) != "2" {
		t.Errorf("the cache mount did not survive between builds: %q runs", runs)
	}
	if first.BuilderReady == 0 || second.BuilderReady != 0 {
		t.Errorf("builder ready: first %d ms (want a cold boot), second %d ms (want warm)", first.BuilderReady, second.BuilderReady)
	}
	t.Logf("first %d ms, second %d ms, cached %d/%d", first.DurationMS, second.DurationMS, second.CachedSteps, second.TotalSteps)
}

func (h *harness) submit(t *testing.T, project string, spec api.BuildSpec, files map[string]string, secrets map[string][]byte) api.Build {
	t.Helper()
	b, err := h.svc.Submit(context.Background(), project, spec, ctxTar(files), secrets)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func logOf(h *harness, id string) string {
	b, _ := os.ReadFile(h.svc.LogPath(id))
	return string(b)
}

// waitLog waits until the build's log contains s.
func (h *harness) waitLog(t *testing.T, id, s string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for !strings.Contains(logOf(h, id), s) {
		if time.Now().After(deadline) {
			t.Fatalf("build %s never logged %q:\n%s", id, s, logOf(h, id))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// A failing RUN fails the build at once, with the step and its output, and no retry.
// Killing the builder VM mid-build is an infrastructure failure: retried, and the retry
// succeeds on a new VM over the same cache.
func TestBuildFailuresCodeVersusInfrastructure(t *testing.T) {
	h := newHarness(t)
	bad := h.wait(t, h.submit(t, "shop", api.BuildSpec{}, map[string]string{
		"Dockerfile": "FROM localhost/busybox:1\nRUN echo about to fail; exit 7\n"}, nil).ID)
	if bad.State != build.Failed || bad.Failure != "code" || bad.Attempt != 1 || len(bad.Retries) != 0 {
		t.Fatalf("failing RUN: %+v", bad)
	}
	if l := logOf(h, bad.ID); !strings.Contains(l, "about to fail") || !strings.Contains(l, "exit code: 7") {
		t.Errorf("the log lacks the step's output and exit code:\n%s", l)
	}

	b := h.submit(t, "shop", api.BuildSpec{}, map[string]string{
		"Dockerfile": "FROM localhost/busybox:1\nRUN echo step-started; sleep 4; echo slow > /slow\n"}, nil)
	h.waitLog(t, b.ID, "step-started")
	bd := h.svc.Builders.Running()["shop"]
	if bd == nil {
		t.Fatal("no builder running for shop")
	}
	if err := bd.Inst.VM.Kill(context.Background()); err != nil {
		t.Fatal(err)
	}
	done := h.wait(t, b.ID)
	if done.State != build.Succeeded || done.Attempt != 2 || len(done.Retries) != 1 {
		t.Fatalf("after the builder was killed: %+v\n%s", done, logOf(h, b.ID))
	}
	if !strings.Contains(done.Retries[0], "went away") {
		t.Errorf("the retry does not say why: %q", done.Retries[0])
	}
}

// A newer build of the same project and branch cancels the one it supersedes.
func TestSupersede(t *testing.T) {
	h := newHarness(t)
	slow := h.submit(t, "shop", api.BuildSpec{Branch: "main"}, map[string]string{
		"Dockerfile": "FROM localhost/busybox:1\nRUN echo slow-started; sleep 30\n"}, nil)
	h.waitLog(t, slow.ID, "slow-started")
	next := h.submit(t, "shop", api.BuildSpec{Branch: "main"}, map[string]string{
		"Dockerfile": "FROM localhost/busybox:1\nRUN echo fast > /fast\n"}, nil)
	old := h.wait(t, slow.ID)
	if old.State != build.Canceled || !strings.Contains(old.Error, "superseded by build "+next.ID) {
		t.Fatalf("superseded build: %+v", old)
	}
	if b := h.wait(t, next.ID); b.State != build.Succeeded {
		t.Fatalf("superseding build: %+v\n%s", b, logOf(h, next.ID))
	}
}

// A secret reaches the step that mounts it and appears nowhere else: not in the image,
// the log or the cache volume.
func TestSecretsStayOut(t *testing.T) {
	h := newHarness(t)
	const secret = "s3cr3t-7f1c2a"
	b := h.wait(t, h.submit(t, "shop", api.BuildSpec{Tags: []string{"localhost/shop/sec:1"}}, map[string]string{
		"Dockerfile": "FROM localhost/busybox:1\nRUN --mount=type=secret,id=token sh -c 'wc -c < /run/secrets/token > /ok'\n"},
		map[string][]byte{"token": []byte(secret)}).ID)
	if b.State != build.Succeeded {
		t.Fatalf("%+v\n%s", b, logOf(h, b.ID))
	}
	img, _ := h.reg.Resolve(context.Background(), "localhost/shop/sec:1")
	if ok, _ := fileIn(t, img, "ok"); strings.TrimSpace(ok) != fmt.Sprint(len(secret)) {
		t.Fatalf("the step did not see the secret: %q", ok)
	}
	rc := mutate.Extract(img)
	all, _ := io.ReadAll(rc)
	rc.Close()
	raw, _ := img.RawConfigFile()
	if bytes.Contains(all, []byte(secret)) || bytes.Contains(raw, []byte(secret)) {
		t.Error("the secret is in the image")
	}
	if strings.Contains(logOf(h, b.ID), secret) {
		t.Error("the secret is in the log")
	}
	bd := h.svc.Builders.Running()["shop"]
	if st, err := bd.Inst.Agent.Exec(context.Background(), guestSync, guestIO()); err != nil || st.Code != 0 {
		t.Fatalf("sync in the builder: %v", err)
	}
	cache, _ := os.ReadFile(h.svc.Builders.CachePath("shop"))
	if bytes.Contains(cache, []byte(secret)) {
		t.Error("the secret is on the cache volume")
	}
}

// Two projects' builds run in different VMs on different volumes: a RUN step of one
// cannot see what the other left in its cache.
func TestProjectsAreIsolated(t *testing.T) {
	h := newHarness(t)
	df := "FROM localhost/busybox:1\nRUN --mount=type=cache,target=/cache,id=shared sh -c 'echo $(cat /etc/hostname) > /cache/mine-%s; ls /cache > /seen'\n"
	a := h.wait(t, h.submit(t, "alpha", api.BuildSpec{Tags: []string{"localhost/alpha/x:1"}}, map[string]string{"Dockerfile": fmt.Sprintf(df, "alpha")}, nil).ID)
	b := h.wait(t, h.submit(t, "beta", api.BuildSpec{Tags: []string{"localhost/beta/x:1"}}, map[string]string{"Dockerfile": fmt.Sprintf(df, "beta")}, nil).ID)
	if a.State != build.Succeeded || b.State != build.Succeeded {
		t.Fatalf("builds: %+v %+v", a, b)
	}
	img, _ := h.reg.Resolve(context.Background(), "localhost/beta/x:1")
	if seen, _ := fileIn(t, img, "seen"); strings.Contains(seen, "alpha") || !strings.Contains(seen, "mine-beta") {
		t.Fatalf("beta's step saw %q in its cache mount", seen)
	}
	if h.svc.Builders.Running()["alpha"].Inst == h.svc.Builders.Running()["beta"].Inst {
		t.Fatal("two projects share a builder VM")
	}
}

// Bad input is refused before any VM starts, and leaves nothing behind.
func TestBadInput(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	var big strings.Builder
	for big.Len() < 65<<20 {
		big.WriteString(strings.Repeat("x", 1<<20))
	}
	cases := []struct {
		name    string
		project string
		spec    api.BuildSpec
		ctx     io.Reader
		want    string
	}{
		{"no Dockerfile", "shop", api.BuildSpec{}, ctxTar(map[string]string{"main.go": "x"}), "no Dockerfile at Dockerfile"},
		{"unknown stage", "shop", api.BuildSpec{Target: "prod"}, ctxTar(map[string]string{"Dockerfile": "FROM localhost/busybox:1 AS dev\n"}), `target stage "prod" is not in Dockerfile (stages: dev)`},
		{"syntax", "shop", api.BuildSpec{}, ctxTar(map[string]string{"Dockerfile": "FROMM localhost/busybox:1\n"}), "Dockerfile"},
		{"bad tag", "shop", api.BuildSpec{Tags: []string{"Not A Ref!"}}, ctxTar(map[string]string{"Dockerfile": "FROM localhost/busybox:1\n"}), "is not a valid image reference"},
		{"bad project", "Shop_1", api.BuildSpec{}, ctxTar(map[string]string{"Dockerfile": "FROM localhost/busybox:1\n"}), "project name"},
		{"unknown base", "shop", api.BuildSpec{}, ctxTar(map[string]string{"Dockerfile": "FROM localhost/nope:1\n"}), "base image localhost/nope:1 is not in kiln's registry"},
		{"too big", "shop", api.BuildSpec{}, ctxTar(map[string]string{"Dockerfile": "FROM localhost/busybox:1\n", "big": big.String()}), "larger than the 64 MiB limit"},
		{"traversal", "shop", api.BuildSpec{}, traversalTar(), "points outside the context"},
		{"dockerfile outside", "shop", api.BuildSpec{Dockerfile: "../Dockerfile"}, ctxTar(map[string]string{"Dockerfile": "FROM localhost/busybox:1\n"}), "must be a path inside the context"},
	}
	for _, c := range cases {
		_, err := h.svc.Submit(ctx, c.project, c.spec, c.ctx, nil)
		if err == nil || !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v; want an invalid-argument error containing %q", c.name, err, c.want)
		}
	}
	if bs, _ := h.svc.List(ctx, "shop"); len(bs) != 0 {
		t.Errorf("refused builds were recorded: %+v", bs)
	}
	if ents, _ := os.ReadDir(h.svc.Dir); len(ents) != 0 {
		t.Errorf("refused builds left %d directories", len(ents))
	}
	if len(h.svc.Builders.Running()) != 0 {
		t.Error("a builder started for bad input")
	}
}

func traversalTar() io.Reader {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	body := "owned"
	tw.WriteHeader(&tar.Header{Name: "Dockerfile", Mode: 0o644, Size: 25, Typeflag: tar.TypeReg})
	tw.Write([]byte("FROM localhost/busybox:1\n"))
	tw.WriteHeader(&tar.Header{Name: "../../escaped", Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg})
	tw.Write([]byte(body))
	tw.Close()
	return &buf
}

// A step that prints far more than the log cap leaves a capped log marked truncated.
func TestLogCap(t *testing.T) {
	// BuildKit itself sends at most 200 KiB/s of a step's output; a cap below that shows
	// kiln's own.
	h := newHarness(t, func(s *build.Service) { s.MaxLogBytes = 64 << 10 })
	b := h.wait(t, h.submit(t, "shop", api.BuildSpec{}, map[string]string{
		"Dockerfile": "FROM localhost/busybox:1\nRUN head -c 1500000 /dev/urandom | od -An -x\n"}, nil).ID)
	if b.State != build.Succeeded || !b.LogTruncated {
		l := logOf(h, b.ID)
		t.Fatalf("state %s, truncated %v, log of %d bytes ending:\n%s", b.State, b.LogTruncated, len(l), l[max(0, len(l)-1500):])
	}
	fi, _ := os.Stat(h.svc.LogPath(b.ID))
	if fi.Size() > 64<<10+4096 {
		t.Errorf("log is %d bytes, over the 64 KiB cap", fi.Size())
	}
}

var guestSync = guest.ExecRequest{Argv: []string{"sync"}}

func guestIO() guest.IO { return guest.IO{} }

// An idle builder is suspended, and the project's next build resumes it (the same VM
// with buildkitd still running) instead of booting one.
func TestIdleBuilderSuspendsAndResumes(t *testing.T) {
	h := newHarness(t, func(s *build.Service) { s.Builders.Idle = time.Second })
	files := map[string]string{"Dockerfile": "FROM localhost/busybox:1\nRUN echo once > /once\n"}
	first := h.wait(t, h.submit(t, "shop", api.BuildSpec{}, files, nil).ID)
	if first.State != build.Succeeded || first.Builder != "cold" {
		t.Fatalf("first: %+v", first)
	}
	deadline := time.Now().Add(time.Minute)
	for len(h.svc.Builders.Suspended()) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the idle builder was not suspended")
		}
		time.Sleep(200 * time.Millisecond)
	}
	second := h.wait(t, h.submit(t, "shop", api.BuildSpec{}, files, nil).ID)
	if second.State != build.Succeeded || second.Builder != "resumed" || second.CachedSteps != second.TotalSteps {
		t.Fatalf("second: %+v\n%s", second, logOf(h, second.ID))
	}
	t.Logf("cold builder ready in %d ms, resumed in %d ms", first.BuilderReady, second.BuilderReady)
}

// A cache over 75 % of its volume after a build is reset, logged and counted; a prune
// empties it, so the next build caches nothing.
func TestCacheHousekeeping(t *testing.T) {
	h := newHarness(t, func(s *build.Service) { s.Builders.CacheBytes, s.Builders.KeepBytes = 512<<20, 128<<20 })
	ctx := context.Background()
	files := map[string]string{"Dockerfile": "FROM localhost/busybox:1\nRUN echo one > /one\n"}
	if b := h.wait(t, h.submit(t, "shop", api.BuildSpec{}, files, nil).ID); b.State != build.Succeeded {
		t.Fatalf("%+v", b)
	}
	info, err := h.svc.CacheInfo(ctx, "shop")
	if err != nil || info.Builder != "running" || info.UsedBytes == 0 || info.SizeBytes < 400<<20 {
		t.Fatalf("cache info: %+v %v", info, err)
	}
	// Fill the volume past 75 % behind BuildKit's back.
	bd := h.svc.Builders.Running()["shop"]
	fill := guest.ExecRequest{Argv: []string{"sh", "-c", "dd if=/dev/zero of=/var/lib/buildkit/filler bs=1M count=420 2>/dev/null; sync"}}
	if st, err := bd.Inst.Agent.Exec(ctx, fill, guest.IO{}); err != nil || st.Code != 0 {
		t.Fatalf("filling the cache volume: %+v %v", st, err)
	}
	b := h.wait(t, h.submit(t, "shop", api.BuildSpec{}, files, nil).ID)
	if b.State != build.Succeeded || !strings.Contains(logOf(h, b.ID), "full after GC: reset it") || h.svc.Builders.CacheResets("shop") != 1 {
		t.Fatalf("over-full cache: %+v resets %d\n%s", b, h.svc.Builders.CacheResets("shop"), logOf(h, b.ID))
	}
	bd.Inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"rm", "-f", "/var/lib/buildkit/filler"}}, guest.IO{})
	if _, err := h.svc.PruneCache(ctx, "shop"); err != nil {
		t.Fatal(err)
	}
	if b := h.wait(t, h.submit(t, "shop", api.BuildSpec{}, files, nil).ID); b.State != build.Succeeded || b.CachedSteps != 0 {
		t.Fatalf("after a prune: %d of %d steps cached, want none", b.CachedSteps, b.TotalSteps)
	}
}

// Only the newest KeepImages build images of a project stay; older ones are deleted by
// digest, and the build says so.
func TestPruneOldImages(t *testing.T) {
	h := newHarness(t, func(s *build.Service) { s.KeepImages = 1 })
	ctx := context.Background()
	first := h.wait(t, h.submit(t, "shop", api.BuildSpec{Tags: []string{"localhost/shop/web:1"}}, map[string]string{"Dockerfile": "FROM localhost/busybox:1\nRUN echo 1 > /v\n"}, nil).ID)
	second := h.wait(t, h.submit(t, "shop", api.BuildSpec{Tags: []string{"localhost/shop/web:2"}}, map[string]string{"Dockerfile": "FROM localhost/busybox:1\nRUN echo 2 > /v\n"}, nil).ID)
	if first.State != build.Succeeded || second.State != build.Succeeded {
		t.Fatalf("%+v %+v", first, second)
	}
	h.reg.mu.Lock()
	deleted := append([]string(nil), h.reg.deleted...)
	h.reg.mu.Unlock()
	if len(deleted) != 1 || deleted[0] != "localhost/shop/web@"+first.Image {
		t.Fatalf("deleted %v, want only the first build's image", deleted)
	}
	if b, _ := h.svc.Get(ctx, first.ID); !b.Pruned {
		t.Error("the first build does not say its image was pruned")
	}
	if b, _ := h.svc.Get(ctx, second.ID); b.Pruned {
		t.Error("the newest build's image was pruned")
	}
}

// A context can come from a git repository, at a branch or a commit; kiln clones it on
// the host. Bad git input is refused before any VM starts.
func TestGitContext(t *testing.T) {
	h := newHarness(t, func(s *build.Service) { s.Git.AllowFile = true })
	ctx := context.Background()
	repo := testutil.TempDir(t)
	os.Chmod(repo, 0o755) // git fetches as an unprivileged user
	git := func(args ...string) string {
		cmd := exec.Command("git", append([]string{"-C", repo, "-c", "user.name=t", "-c", "user.email=t@t"}, args...)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("git %v: %v %s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	git("init", "-q", "-b", "main")
	os.WriteFile(filepath.Join(repo, "Dockerfile"), []byte("FROM localhost/busybox:1\nCOPY msg /msg\n"), 0o644)
	os.WriteFile(filepath.Join(repo, "msg"), []byte("from git v1\n"), 0o644)
	git("add", ".")
	git("commit", "-q", "-m", "v1")
	v1 := git("rev-parse", "HEAD")
	os.WriteFile(filepath.Join(repo, "msg"), []byte("from git v2\n"), 0o644)
	git("commit", "-q", "-am", "v2")
	for _, c := range []struct{ ref, want string }{{"main", "from git v2\n"}, {v1, "from git v1\n"}} {
		b := h.wait(t, h.submit(t, "shop", api.BuildSpec{GitURL: "file://" + repo, GitRef: c.ref, Tags: []string{"localhost/shop/git:" + c.ref[:4]}}, map[string]string{}, nil).ID)
		if b.State != build.Succeeded {
			t.Fatalf("git build at %s: %+v\n%s", c.ref, b, logOf(h, b.ID))
		}
		img, _ := h.reg.Resolve(ctx, "localhost/shop/git:"+c.ref[:4])
		if got, _ := fileIn(t, img, "msg"); got != c.want {
			t.Errorf("at %s the image has %q, want %q", c.ref, got, c.want)
		}
	}
	for _, bad := range []struct {
		spec api.BuildSpec
		ctx  map[string]string
		want string
	}{
		{api.BuildSpec{GitURL: "ext::sh -c touch% /tmp/pwned"}, map[string]string{}, `scheme "ext" is not supported`},
		{api.BuildSpec{GitURL: "file://" + repo}, map[string]string{"Dockerfile": "FROM x\n"}, "not both"},
		{api.BuildSpec{GitURL: "file://" + repo, GitRef: "no-such-branch"}, map[string]string{}, "fetching the build context"},
	} {
		if _, err := h.svc.Submit(ctx, "shop", bad.spec, ctxTar(bad.ctx), nil); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%+v: %v, want %q", bad.spec, err, bad.want)
		}
	}
}

// uploads records the blobs kiln's registry received: the digest of each finished
// upload (a PUT naming it) and each cross-repository mount.
type uploads struct {
	mu      sync.Mutex
	digests []string
}

func (u *uploads) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if dg := r.URL.Query().Get("digest"); r.Method == http.MethodPut && dg != "" && strings.Contains(r.URL.Path, "/blobs/uploads/") {
			u.add(dg)
		}
		if dg := r.URL.Query().Get("mount"); r.Method == http.MethodPost && dg != "" {
			u.add(dg)
		}
		h.ServeHTTP(w, r)
	})
}

func (u *uploads) add(dg string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.digests = append(u.digests, dg)
}

// take returns the digests received since the last take.
func (u *uploads) take() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := u.digests
	u.digests = nil
	return out
}

// layersOf lists an image's layer digests.
func layersOf(t *testing.T, img v1.Image) map[string]bool {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, l := range m.Layers {
		out[l.Digest.String()] = true
	}
	return out
}

// A rebuild with no change sends kiln's registry no layer, and its builder sends kiln
// only the image's new config and manifest; every tag names the digest the build
// reports. A change still sends the layers it changed, and only those.
func TestRebuildSendsOnlyNewBlobs(t *testing.T) {
	ctx := context.Background()
	checker, token := authtest.Operator()
	var up uploads
	srv := httptest.NewServer(up.wrap(kilnregistry.Handler(ctx, filepath.Join(testutil.TempDir(t), "registry"), kilnregistry.Access{Auth: checker})))
	t.Cleanup(srv.Close)
	reg := image.Registries{Local: strings.TrimPrefix(srv.URL, "http://"), Token: token}
	if _, _, err := reg.Push(ctx, imagetest.Base(t), "localhost/busybox:1"); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(s *build.Service) { s.Images = reg })
	tags := []string{"localhost/shop/web:v1", "localhost/shop/web:latest"}
	files := map[string]string{"Dockerfile": appDockerfile, "main.txt": "one\n"}
	run := func(what string) (api.Build, v1.Image) {
		t.Helper()
		b := h.wait(t, h.submit(t, "shop", api.BuildSpec{Tags: tags}, files, nil).ID)
		if b.State != build.Succeeded {
			t.Fatalf("%s build %s: %s %s\n%s", what, b.ID, b.State, b.Error, logOf(h, b.ID))
		}
		var img v1.Image
		for _, tag := range tags {
			got, err := reg.Resolve(ctx, tag)
			if err != nil {
				t.Fatalf("%s build: %s: %v", what, tag, err)
			}
			if dg, _ := got.Digest(); dg.String() != b.Image {
				t.Errorf("%s build reports %s, but %s is %s", what, b.Image, tag, dg)
			}
			img = got
		}
		return b, img
	}
	_, firstImg := run("first")
	up.take()

	same, sameImg := run("no-change")
	layers := layersOf(t, sameImg)
	if fmt.Sprint(layers) != fmt.Sprint(layersOf(t, firstImg)) {
		t.Errorf("the no-change rebuild has other layers than the first build")
	}
	got := up.take()
	for _, dg := range got {
		if layers[dg] {
			t.Errorf("the no-change rebuild sent the registry layer %s again", dg)
		}
	}
	// Its config is new (it names the build), and reaches the registry once.
	if len(got) > 1 {
		t.Errorf("the no-change rebuild sent the registry %d blobs, want its config only: %v", len(got), got)
	}
	if same.CachedSteps != same.TotalSteps || same.TotalSteps == 0 {
		t.Errorf("no-change rebuild: %d of %d steps cached, want all", same.CachedSteps, same.TotalSteps)
	}
	raw, _ := sameImg.RawManifest()
	m, _ := sameImg.Manifest()
	if want := int64(len(raw)) + m.Config.Size; same.ImageSentBytes != want {
		t.Errorf("the builder sent %d bytes of the no-change rebuild's image, want %d (its manifest and config)\n%s", same.ImageSentBytes, want, logOf(h, same.ID))
	}

	files["main.txt"] = "two\n"
	changed, changedImg := run("changed")
	if out, _ := fileIn(t, changedImg, "out"); out != "two\n" {
		t.Errorf("/out after the change: %q", out)
	}
	sent := map[string]bool{}
	for _, dg := range up.take() {
		sent[dg] = true
	}
	changedLayers := 0
	for dg := range layersOf(t, changedImg) {
		if !layers[dg] {
			changedLayers++
		}
		if sent[dg] == layers[dg] {
			t.Errorf("layer %s of the changed build: sent to the registry %v, in the previous image %v", dg, sent[dg], layers[dg])
		}
	}
	if changedLayers == 0 {
		t.Errorf("the changed build has the layers of the unchanged one")
	}
	if changed.ImageSentBytes <= same.ImageSentBytes {
		t.Errorf("the builder sent %d bytes of the changed build's image, no more than of the unchanged one (%d)", changed.ImageSentBytes, same.ImageSentBytes)
	}
	// kiln keeps the project's last image only, which the next build compares with.
	blobs, _ := filepath.Glob(filepath.Join(h.dir, "builds", "images", "shop", "blobs", "sha256", "*"))
	if want := len(layersOf(t, changedImg)) + 2; len(blobs) != want {
		t.Errorf("the project's image store holds %d blobs, want the last image's %d", len(blobs), want)
	}
}
