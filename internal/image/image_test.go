package image_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/registry"
	"github.com/kilnhq/kiln/internal/volume"
)

func TestUnpackKeepsWhatLayersSay(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("owners and device nodes need root")
	}
	img := imagetest.App(t)
	root := t.TempDir()
	layers, _ := img.Layers()
	for _, l := range layers {
		rc, _ := l.Uncompressed()
		if _, err := image.ApplyLayer(rc, root); err != nil {
			t.Fatal(err)
		}
		rc.Close()
	}
	if _, err := os.Stat(filepath.Join(root, "etc/obsolete")); !os.IsNotExist(err) {
		t.Error("the whiteout in the top layer did not delete etc/obsolete")
	}
	var a, b syscall.Stat_t
	syscall.Stat(filepath.Join(root, "bin/busybox"), &a)
	syscall.Stat(filepath.Join(root, "bin/sh"), &b)
	if a.Ino != b.Ino {
		t.Error("bin/sh is not a hard link to bin/busybox")
	}
	if l, _ := os.Readlink(filepath.Join(root, "bin/ls")); l != "busybox" {
		t.Errorf("bin/ls links to %q", l)
	}
	fi, _ := os.Stat(filepath.Join(root, "data"))
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm() != 0o750 || st.Uid != 1234 || st.Gid != 1234 {
		t.Errorf("data: mode %v owner %d:%d", fi.Mode(), st.Uid, st.Gid)
	}
	if fi, _ := os.Stat(filepath.Join(root, "usr/bin/setuid")); fi.Mode()&os.ModeSetuid == 0 {
		t.Errorf("setuid bit lost: %v", fi.Mode())
	}
	buf := make([]byte, 16)
	n, err := unix.Lgetxattr(filepath.Join(root, "data/hello"), "user.kiln", buf)
	if err != nil || string(buf[:n]) != "kept" {
		t.Errorf("xattr: %q %v", buf[:n], err)
	}
}

// No entry, link or symlink in an image can make extraction touch anything outside the
// root, whatever the layers try.
func TestApplyLayerStaysInsideRoot(t *testing.T) {
	dir := t.TempDir()
	outside := filepath.Join(dir, "outside")
	os.MkdirAll(outside, 0o755)
	os.WriteFile(filepath.Join(outside, "secret"), []byte("host"), 0o644)
	root := filepath.Join(dir, "root")
	os.MkdirAll(root, 0o755)
	layer := func(hs ...tar.Header) *bytes.Buffer {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, h := range hs {
			if h.Typeflag == tar.TypeReg {
				h.Size = 4
			}
			tw.WriteHeader(&h)
			if h.Typeflag == tar.TypeReg {
				tw.Write([]byte("evil"))
			}
		}
		tw.Close()
		return &buf
	}
	// A symlink to the outside, absolute and relative, then writes through it.
	image.ApplyLayer(layer(
		tar.Header{Name: "abs", Typeflag: tar.TypeSymlink, Linkname: outside},
		tar.Header{Name: "rel", Typeflag: tar.TypeSymlink, Linkname: "../outside"},
		tar.Header{Name: "../../outside/x", Typeflag: tar.TypeReg, Mode: 0o644},
	), root)
	image.ApplyLayer(layer(
		tar.Header{Name: "abs/secret", Typeflag: tar.TypeReg, Mode: 0o644},
		tar.Header{Name: "rel/secret", Typeflag: tar.TypeReg, Mode: 0o644},
		tar.Header{Name: "abs/.wh.secret", Typeflag: tar.TypeReg, Mode: 0o644},
		tar.Header{Name: "hl", Typeflag: tar.TypeLink, Linkname: "../outside/secret"},
	), root)
	if b, err := os.ReadFile(filepath.Join(outside, "secret")); err != nil || string(b) != "host" {
		t.Errorf("the host file was changed: %q %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(outside, "x")); err == nil {
		t.Error("a file was written outside the root")
	}
	var st syscall.Stat_t
	syscall.Stat(filepath.Join(outside, "secret"), &st)
	if st.Nlink != 1 {
		t.Error("a hard link to a host file was made")
	}
}

// A later layer writing below a directory symlink of a lower layer follows it, as a
// container runtime does (merged /usr: /lib -> usr/lib).
func TestApplyLayerFollowsSymlinkedDirs(t *testing.T) {
	root := t.TempDir()
	for _, l := range [][]tar.Header{
		{{Name: "usr/lib/", Typeflag: tar.TypeDir, Mode: 0o755}, {Name: "lib", Typeflag: tar.TypeSymlink, Linkname: "usr/lib"}},
		{{Name: "lib/libx.so", Typeflag: tar.TypeReg, Mode: 0o644}},
		{{Name: "lib/.wh.libx.so", Typeflag: tar.TypeReg}, {Name: "usr/lib/liby.so", Typeflag: tar.TypeReg, Mode: 0o644}},
	} {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, h := range l {
			tw.WriteHeader(&h)
		}
		tw.Close()
		if _, err := image.ApplyLayer(&buf, root); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "usr/lib/liby.so")); err != nil {
		t.Error(err)
	}
	if _, err := os.Stat(filepath.Join(root, "usr/lib/libx.so")); !os.IsNotExist(err) {
		t.Error("the whiteout through the symlink did not remove usr/lib/libx.so")
	}
	if fi, err := os.Lstat(filepath.Join(root, "lib")); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Error("lib is no longer a symlink")
	}
}

func TestRootfsFromBothTarballFormats(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("unpacking image owners needs root")
	}
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
	srv := httptest.NewServer(registry.Handler(ctx, t.TempDir(), "tok"))
	defer srv.Close()
	regs := image.Registries{Local: strings.TrimPrefix(srv.URL, "http://"), Token: "tok"}
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
