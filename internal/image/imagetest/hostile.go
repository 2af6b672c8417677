package imagetest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// GzipBomb is a layer holding one file of n zero bytes, which compresses to almost
// nothing.
func GzipBomb(t testing.TB, n int64) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	tw := tar.NewWriter(zw)
	tw.WriteHeader(&tar.Header{Name: "zeros", Typeflag: tar.TypeReg, Mode: 0o644, Size: n})
	io.CopyN(tw, zeros{}, n)
	tw.Close()
	zw.Close()
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// SparseLayer is a layer that GNU tar wrote with --sparse: one file, "sparse", of size
// bytes that are all hole, so the layer itself is a few KiB.
func SparseLayer(t testing.TB, size int64) v1.Layer {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "sparse"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(dir, "sparse"), size); err != nil {
		t.Fatal(err)
	}
	tarPath := filepath.Join(t.TempDir(), "layer.tar")
	if out, err := exec.Command("tar", "--sparse", "-C", dir, "-cf", tarPath, "sparse").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v %s", err, out)
	}
	if fi, _ := os.Stat(tarPath); fi.Size() > 1<<20 {
		t.Fatalf("the layer is %d bytes: not sparse", fi.Size())
	}
	l, err := tarball.LayerFromFile(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	return l
}
