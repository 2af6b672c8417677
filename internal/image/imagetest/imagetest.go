// Package imagetest builds small OCI images for tests, locally and without a registry:
// a static busybox as the userland, layers that exercise whiteouts, hard links,
// symlinks, owners and extended attributes, and a config that names a user.
package imagetest

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Entry is one file in a layer.
type Entry struct {
	Name     string
	Type     byte // tar.TypeReg when zero
	Mode     int64
	UID, GID int
	Body     []byte
	Link     string
	Xattrs   map[string]string
	Dev      [2]int64 // major, minor of a device node
}

// Layer builds an uncompressed layer from entries.
func Layer(t testing.TB, entries ...Entry) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.Name, Typeflag: e.Type, Mode: e.Mode, Uid: e.UID, Gid: e.GID,
			Linkname: e.Link, ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX,
			Devmajor: e.Dev[0], Devminor: e.Dev[1]}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.Body))
		}
		for k, v := range e.Xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write(e.Body)
	}
	tw.Close()
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Busybox returns the host's static busybox, which `make setup` installs.
func Busybox(t testing.TB) []byte {
	t.Helper()
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if out, err := exec.Command("file", "-L", p).Output(); err == nil && !bytes.Contains(out, []byte("statically linked")) {
			continue
		}
		if b, err := os.ReadFile(p); err == nil {
			return b
		}
	}
	t.Skip("static busybox not installed: run `make setup` (busybox-static)")
	return nil
}

// App is a two-layer image: busybox with /bin/sh as a hard link and /bin/ls as a
// symlink, a user "app" (1234:1234), a file the second layer deletes with a whiteout, and
// a config that runs `echo $GREETING from $(id -u) in $(pwd)` as that user in /data.
func App(t testing.TB) v1.Image {
	t.Helper()
	bb := Busybox(t)
	base := Layer(t,
		Entry{Name: "bin/", Type: tar.TypeDir},
		Entry{Name: "bin/busybox", Mode: 0o755, Body: bb},
		Entry{Name: "bin/sh", Type: tar.TypeLink, Link: "bin/busybox"},
		Entry{Name: "bin/ls", Type: tar.TypeSymlink, Link: "busybox"},
		Entry{Name: "etc/", Type: tar.TypeDir},
		Entry{Name: "etc/passwd", Body: []byte("root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234:app:/data:/bin/sh\n")},
		Entry{Name: "etc/group", Body: []byte("root:x:0:\napp:x:1234:\n")},
		Entry{Name: "etc/obsolete", Body: []byte("deleted by the next layer")},
		Entry{Name: "data/", Type: tar.TypeDir, UID: 1234, GID: 1234, Mode: 0o750},
		Entry{Name: "data/hello", Body: []byte("hello\n"), UID: 1234, GID: 1234, Xattrs: map[string]string{"user.kiln": "kept"}},
		Entry{Name: "usr/bin/", Type: tar.TypeDir},
		Entry{Name: "usr/bin/setuid", Mode: 0o4755, Body: []byte("#!/bin/sh\n")},
	)
	top := Layer(t,
		Entry{Name: "etc/.wh.obsolete"},
		Entry{Name: "data/added", Body: []byte("second layer\n"), UID: 1234, GID: 1234},
	)
	img, err := mutate.AppendLayers(empty.Image, base, top)
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Config = v1.Config{
		Entrypoint: []string{"/bin/sh", "-c"},
		Cmd:        []string{"echo $GREETING from $(id -u) in $(pwd)"},
		Env:        []string{"PATH=/bin:/usr/bin", "GREETING=hi"},
		WorkingDir: "/data",
		User:       "app",
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// WriteDockerTarball writes img as `docker save` would, tagged ref.
func WriteDockerTarball(t testing.TB, img v1.Image, ref, path string) {
	t.Helper()
	tag, err := name.NewTag(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := tarball.WriteToFile(path, tag, img); err != nil {
		t.Fatal(err)
	}
}

// WriteOCITarball writes img as an OCI image layout packed in a tarball.
func WriteOCITarball(t testing.TB, img v1.Image, path string) {
	t.Helper()
	dir := t.TempDir()
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	defer tw.Close()
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		rel, _ := filepath.Rel(dir, p)
		if rel == "." || err != nil {
			return err
		}
		h, _ := tar.FileInfoHeader(fi, "")
		h.Name = rel
		tw.WriteHeader(h)
		if fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			tw.Write(b)
		}
		return nil
	})
}

// BaseApplets are the busybox commands Base links into /bin.
var BaseApplets = []string{"sh", "cat", "echo", "wc", "ls", "mkdir", "id", "head", "od", "tr", "sleep", "true", "false", "env"}

// Base is a minimal base image for builds: a static busybox with BaseApplets linked in
// /bin, /tmp, and root as the user, the way distribution base images are laid out.
func Base(t testing.TB) v1.Image {
	t.Helper()
	entries := []Entry{
		{Name: "bin/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "bin/busybox", Mode: 0o755, Body: Busybox(t)},
		{Name: "etc/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "etc/passwd", Mode: 0o644, Body: []byte("root:x:0:0:root:/root:/bin/sh\n")},
		{Name: "etc/group", Mode: 0o644, Body: []byte("root:x:0:\n")},
		{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
		{Name: "root/", Type: tar.TypeDir, Mode: 0o700},
	}
	for _, a := range BaseApplets {
		entries = append(entries, Entry{Name: "bin/" + a, Type: tar.TypeSymlink, Link: "busybox"})
	}
	img, err := mutate.AppendLayers(empty.Image, Layer(t, entries...))
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Config = v1.Config{Cmd: []string{"/bin/sh"}, Env: []string{"PATH=/bin"}}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}
