package build_test

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/image/imagetest"
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
	mu     sync.Mutex
	base   v1.Image
	pushed map[string]v1.Image
	dir    string
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

func (r *registry) Load(_ context.Context, tarball string, extra ...string) (string, []string, error) {
	// Keep a copy: the service removes its tarball.
	cp := filepath.Join(r.dir, filepath.Base(filepath.Dir(tarball))+".tar")
	b, err := os.ReadFile(tarball)
	if err != nil {
		return "", nil, err
	}
	os.WriteFile(cp, b, 0o644)
	img, _, err := image.OpenTarball(cp)
	if err != nil {
		return "", nil, err
	}
	dg, _ := img.Digest()
	r.mu.Lock()
	for _, t := range extra {
		r.pushed[t] = img
	}
	r.mu.Unlock()
	return dg.String(), extra, nil
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
}

func newHarness(t *testing.T) *harness {
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
	svc := &build.Service{Store: db, Builders: bs, Bases: &build.Bases{Dir: filepath.Join(dir, "bases")}, Images: reg,
		Dir: filepath.Join(dir, "builds"), MaxContextBytes: 64 << 20, MaxLogBytes: 1 << 20, MaxAttempts: 3,
		Backoff: 100 * time.Millisecond, MaxConcurrent: 2, Log: os.Stderr}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { svc.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		bs.Close(context.Background())
	})
	return &harness{svc: svc, reg: reg}
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
	t.Fatalf("build %s did not end:\n%s", id, log)
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
