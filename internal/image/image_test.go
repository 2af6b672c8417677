package image_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/kilnhq/kiln/internal/auth/authtest"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/registry"
	"github.com/kilnhq/kiln/internal/volume"
)

func TestConvertKeepsWhatLayersSay(t *testing.T) {
	img := imagetest.App(t)
	r, err := image.Cache{Dir: t.TempDir()}.Rootfs(context.Background(), img, nil)
	if err != nil {
		t.Fatal(err)
	}
	fs := imagetest.Ext4{T: t, Path: r.Path}
	fs.Check()
	if _, ok := fs.Stat("/etc/obsolete"); ok {
		t.Error("the whiteout in the top layer did not delete etc/obsolete")
	}
	bb, _ := fs.Stat("/bin/busybox")
	sh, _ := fs.Stat("/bin/sh")
	if bb.Number == 0 || bb.Number != sh.Number || bb.Links != 2 {
		t.Errorf("bin/sh is not a hard link to bin/busybox: %+v %+v", bb, sh)
	}
	if ls, _ := fs.Stat("/bin/ls"); ls.Type != "symlink" || ls.Target != "busybox" {
		t.Errorf("bin/ls: %+v", ls)
	}
	if d, _ := fs.Stat("/data"); d.Type != "directory" || d.Mode != 0o750 || d.UID != 1234 || d.GID != 1234 {
		t.Errorf("data: %+v", d)
	}
	if s, _ := fs.Stat("/usr/bin/setuid"); s.Mode != 0o4755 {
		t.Errorf("setuid bit lost: %o", s.Mode)
	}
	if got := fs.Cat("/data/added"); got != "second layer\n" {
		t.Errorf("data/added = %q", got)
	}
	if got := fs.Xattr("/data/hello", "user.kiln"); got != "kept" {
		t.Errorf("xattr: %q", got)
	}
}

func TestRootfsFromBothTarballFormats(t *testing.T) {
	img := imagetest.App(t)
	dir := t.TempDir()
	docker, oci := filepath.Join(dir, "docker.tar"), filepath.Join(dir, "oci.tar")
	imagetest.WriteDockerTarball(t, img, "localhost/app:1", docker)
	imagetest.WriteOCITarball(t, img, oci)
	want, _ := img.Digest()
	cache := image.Cache{Dir: filepath.Join(dir, "cache")}
	var first image.Rootfs
	for i, p := range []string{docker, oci} {
		loaded, closeImg, err := image.OpenTarball(p)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		got, _ := loaded.Digest()
		if got != want {
			t.Errorf("%s: digest %s, want %s", p, got, want)
		}
		r, err := cache.Rootfs(context.Background(), loaded, nil)
		closeImg()
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = r
			continue
		}
		// The second load of the same image reuses the first conversion.
		if r.Path != first.Path {
			t.Errorf("converted twice: %s and %s", first.Path, r.Path)
		}
	}
	if _, err := volume.Inspect(first.Path); err != nil {
		t.Fatal(err)
	}
	if strings.Join(first.Run.Argv, " ") != "/bin/sh -c echo $GREETING from $(id -u) in $(pwd)" || first.Run.UID != 1234 || first.Run.GID != 1234 || first.Run.Dir != "/data" {
		t.Errorf("run = %+v", first.Run)
	}
	ents, _ := os.ReadDir(cache.Dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "unpack-") || strings.HasSuffix(e.Name(), ".tmp") {
			t.Errorf("left in the cache: %s", e.Name())
		}
	}
}

func TestOpenTarballBadInput(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.tar")
	os.WriteFile(junk, []byte("not a tarball"), 0o644)
	if _, _, err := image.OpenTarball(junk); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("junk: %v", err)
	}
	if _, _, err := image.OpenTarball(filepath.Join(dir, "missing.tar")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("missing: %v", err)
	}
}

func TestRegistryLoadAndResolve(t *testing.T) {
	ctx := context.Background()
	srv := httptest.NewServer(registry.Handler(ctx, t.TempDir(), registry.Access{Auth: opAuth}))
	defer srv.Close()
	regs := image.Registries{Local: strings.TrimPrefix(srv.URL, "http://"), Token: opToken}
	img := imagetest.App(t)
	dir := t.TempDir()
	docker := filepath.Join(dir, "app.tar")
	imagetest.WriteDockerTarball(t, img, "app:1", docker)
	d, refs, err := regs.Load(ctx, docker, "localhost/app:latest")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(refs, " ") != "localhost/app:1 localhost/app:latest" {
		t.Errorf("refs %v", refs)
	}
	for _, ref := range []string{"localhost/app:1", "localhost/app", regs.Local + "/app:1", "localhost/app@" + d} {
		got, err := regs.Resolve(ctx, ref)
		if err != nil {
			t.Errorf("%s: %v", ref, err)
			continue
		}
		if gd, _ := got.Digest(); gd.String() != d {
			t.Errorf("%s resolved to %s", ref, gd)
		}
	}
	if _, err := regs.Resolve(ctx, "localhost/other:1"); !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "kiln image load") {
		t.Errorf("unknown image: %v", err)
	}
	if _, err := regs.Resolve(ctx, "UPPER/Case::bad"); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("bad reference: %v", err)
	}
	if _, _, err := regs.Load(ctx, docker, "ghcr.io/someone/app:1"); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("foreign registry name: %v", err)
	}
	// Without the token the registry refuses, and says how to log in.
	resp, err := http.Get(srv.URL + "/v2/")
	if err != nil || resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" {
		t.Errorf("anonymous /v2/: %v %v", resp.StatusCode, err)
	}
}

// A conversion cut off by a crash leaves its temp file; the next server start removes it
// and keeps finished conversions.
func TestRemoveStale(t *testing.T) {
	dir := t.TempDir()
	cache := image.Cache{Dir: dir}
	r, err := cache.Rootfs(context.Background(), imagetest.App(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(dir, ".sha256-x.ext4.tmp-123")
	os.WriteFile(stale, []byte("half"), 0o600)
	if err := cache.RemoveStale(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Error("the stale temp file is still there")
	}
	if _, err := os.Stat(r.Path); err != nil {
		t.Errorf("a finished conversion was removed: %v", err)
	}
}

// Many creates of one image at once convert it once; the others wait and reuse it.
func TestConcurrentConversionsOfOneImage(t *testing.T) {
	dir := t.TempDir()
	img := imagetest.App(t)
	var log lockedBuffer
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		go func() {
			_, err := image.Cache{Dir: dir}.Rootfs(context.Background(), img, &log)
			errs <- err
		}()
	}
	for i := 0; i < 8; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(log.String(), "converting image"); n != 1 {
		t.Errorf("converted %d times:\n%s", n, log.String())
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 2 {
		t.Errorf("the cache holds %d entries, want one ext4 and its metadata", len(ents))
	}
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// opAuth checks tokens; opToken is the operator's.
var opAuth, opToken = authtest.Operator()
