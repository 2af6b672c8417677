package image_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/volume"
)

// rawTar writes headers (with bodies for regular files) as one tar stream.
func rawTar(hs ...tar.Header) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range hs {
		body := []byte(h.Name)
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(body))
		}
		tw.WriteHeader(&h)
		if h.Typeflag == tar.TypeReg {
			tw.Write(body)
		}
	}
	tw.Close()
	return buf.Bytes()
}

func rawLayer(t testing.TB, b []byte) v1.Layer {
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// FuzzConvertLayer feeds arbitrary bytes as the upper layer of an image over a fixed
// lower one. Whatever they hold, conversion never panics, refuses only with an invalid-
// image error, writes nothing but a valid ext4 file, and leaves no temp file.
func FuzzConvertLayer(f *testing.F) {
	reg := func(name string) tar.Header { return tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644} }
	dir := func(name string, mode int64) tar.Header {
		return tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: mode}
	}
	link := func(name, target string, typ byte) tar.Header {
		return tar.Header{Name: name, Typeflag: typ, Linkname: target, Mode: 0o777}
	}
	for _, seed := range [][]tar.Header{
		{dir("p/", 0o4777), link("p", "/etc/shadow", tar.TypeSymlink)},
		{reg(".wh..")}, {reg("etc/.wh...")}, {reg("etc/.wh.")}, {reg(".wh..wh..opq"), reg("a")},
		{reg("../../etc/passwd")}, {reg("/abs/file")}, {reg("a/./b/../c")},
		{link("evil", "/tmp", tar.TypeSymlink), reg("evil/x")},
		{link("l1", "l2", tar.TypeSymlink), link("l2", "l1", tar.TypeSymlink), reg("l1/x")},
		{link("hl", "/etc/shadow", tar.TypeLink)}, {link("hl", "lower/file", tar.TypeLink)},
		{link("hl", "hl", tar.TypeLink)}, {link("hl", ".", tar.TypeLink)},
		{reg("lower"), reg("lower/under-a-file")}, {reg("lower/file"), dir("lower/file/", 0o755)},
		{{Name: "dev/null", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3, Mode: 0o666}},
		{{Name: "s", Typeflag: tar.TypeReg, Mode: 0o7777, Uid: 1 << 30, Gid: -1}},
		{reg(strings.Repeat("n", 300))}, {reg(strings.Repeat("d/", 3000))},
		{{Name: "x", Typeflag: tar.TypeReg, PAXRecords: map[string]string{"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}}},
	} {
		f.Add(rawTar(seed...))
	}
	f.Add([]byte("not a tar at all"))
	f.Add([]byte{})
	lower := rawTar(dir("lower/", 0o755), reg("lower/file"), reg("etc/shadow"), reg("etc/passwd"))

	f.Fuzz(func(t *testing.T, upper []byte) {
		img := imageOf(t, rawLayer(t, lower), rawLayer(t, upper))
		cacheDir := t.TempDir()
		r, err := image.Cache{Dir: cacheDir, Limits: image.Limits{MaxBytes: 16 << 20, MaxEntries: 10000}}.Rootfs(context.Background(), img, nil)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalid) {
				t.Fatalf("an error that is not an invalid image: %v", err)
			}
		} else if _, err := volume.Inspect(r.Path); err != nil {
			t.Fatalf("the result is not an ext4 image: %v", err)
		}
		if l := leftovers(t, cacheDir); len(l) > 0 {
			t.Fatalf("left in the cache: %v", l)
		}
	})
}

// The seed corpus's converted images are valid filesystems, checked once by e2fsck (too
// slow to run on every fuzz input).
func TestFuzzSeedsMakeCleanFilesystems(t *testing.T) {
	for _, upper := range [][]byte{
		rawTar(tar.Header{Name: "a/b/c", Typeflag: tar.TypeReg, Mode: 0o644}, tar.Header{Name: "a/", Typeflag: tar.TypeDir, Mode: 0o700}),
		rawTar(tar.Header{Name: "evil", Typeflag: tar.TypeSymlink, Linkname: "/x/y"}, tar.Header{Name: "evil/z", Typeflag: tar.TypeReg}),
	} {
		img := imageOf(t, rawLayer(t, upper))
		r, err := image.Cache{Dir: t.TempDir()}.Rootfs(context.Background(), img, nil)
		if err != nil {
			t.Fatal(err)
		}
		imagetest.Ext4{T: t, Path: r.Path}.Check()
	}
}
