package image_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/image/imagetest"
)

// hostFile is a root-owned 0600 file on the host that images try to reach.
type hostFile struct {
	path string
	st   syscall.Stat_t
	body string
}

func newHostFile(t *testing.T, dir string) hostFile {
	t.Helper()
	h := hostFile{path: filepath.Join(dir, "host-secret"), body: "host\n"}
	if err := os.WriteFile(h.path, []byte(h.body), 0o600); err != nil {
		t.Fatal(err)
	}
	syscall.Stat(h.path, &h.st)
	return h
}

// untouched fails the test if the host file changed in any way an image could change it.
func (h hostFile) untouched(t *testing.T) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(h.path, &st); err != nil {
		t.Fatalf("host file: %v", err)
	}
	b, _ := os.ReadFile(h.path)
	if st.Mode != h.st.Mode || st.Uid != h.st.Uid || st.Nlink != h.st.Nlink || string(b) != h.body {
		t.Errorf("host file changed: mode %o→%o uid %d→%d links %d→%d body %q", h.st.Mode, st.Mode, h.st.Uid, st.Uid, h.st.Nlink, st.Nlink, b)
	}
}

func imageOf(t *testing.T, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// leftovers lists what a cache directory holds besides finished conversions.
func leftovers(t *testing.T, dir string) []string {
	t.Helper()
	ents, _ := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".ext4") && !strings.HasSuffix(e.Name(), ".json") {
			out = append(out, e.Name())
		}
	}
	return out
}

// Each hostile image either converts, with the guest's view as its author wrote it, or
// is refused as invalid; either way the host is untouched and nothing is left behind.
func TestHostileImages(t *testing.T) {
	hostDir := t.TempDir()
	host := newHostFile(t, hostDir)
	// Another image already converted: an attack on the cache must not remove it.
	cacheDir := t.TempDir()
	cache := image.Cache{Dir: cacheDir, Limits: image.Limits{MaxBytes: 64 << 20, MaxEntries: 5000}}
	other, err := cache.Rootfs(context.Background(), imagetest.App(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	L := func(e ...imagetest.Entry) v1.Layer { return imagetest.Layer(t, e...) }
	type E = imagetest.Entry
	cases := []struct {
		name    string
		img     v1.Image
		refused string // part of the error; empty if the image converts
		check   func(t *testing.T, fs imagetest.Ext4)
	}{{
		name: "setuid directory replaced by a symlink to a host file",
		img: imageOf(t, L(
			E{Name: "p/", Type: tar.TypeDir, Mode: 0o4777},
			E{Name: "p", Type: tar.TypeSymlink, Link: host.path},
		)),
		check: func(t *testing.T, fs imagetest.Ext4) {
			if p, _ := fs.Stat("/p"); p.Type != "directory" || p.Mode != 0o4777 {
				t.Errorf("p: %+v", p)
			}
		},
	}, {
		name:    "whiteout of the dot",
		img:     imageOf(t, L(E{Name: "bin/x", Body: []byte("x")}), L(E{Name: ".wh.."})),
		refused: `whiteout that names "."`,
	}, {
		name:    "whiteout of dot-dot",
		img:     imageOf(t, L(E{Name: "etc/.wh..."})),
		refused: `whiteout that names ".."`,
	}, {
		name:    "whiteout of nothing",
		img:     imageOf(t, L(E{Name: "etc/.wh."})),
		refused: `whiteout that names ""`,
	}, {
		name:    "entry climbing out",
		img:     imageOf(t, L(E{Name: "../../" + strings.TrimPrefix(host.path, "/"), Body: []byte("pwned")})),
		refused: "climbs out",
	}, {
		name: "device node",
		img:  imageOf(t, L(E{Name: "dev/", Type: tar.TypeDir}, E{Name: "dev/mem2", Type: tar.TypeChar, Mode: 0o666, Dev: [2]int64{1, 1}})),
		check: func(t *testing.T, fs imagetest.Ext4) {
			if d, _ := fs.Stat("/dev/mem2"); d.Type != "character special" || d.Dev != "01:01" || d.Mode != 0o666 {
				t.Errorf("dev/mem2: %+v", d)
			}
		},
	}, {
		name: "setuid root binary",
		img:  imageOf(t, L(E{Name: "bin/su", Mode: 0o4755, Body: []byte("#!/bin/sh\n")})),
		check: func(t *testing.T, fs imagetest.Ext4) {
			if s, _ := fs.Stat("/bin/su"); s.Mode != 0o4755 || s.UID != 0 {
				t.Errorf("bin/su: %+v", s)
			}
		},
	}, {
		name: "hard link to /etc/shadow",
		img: imageOf(t,
			L(E{Name: "etc/shadow", Mode: 0o640, Body: []byte("root:image:\n")}),
			L(E{Name: "stolen", Type: tar.TypeLink, Link: "/etc/shadow"}, E{Name: "hostlink", Type: tar.TypeLink, Link: "/etc/shadow"})),
		check: func(t *testing.T, fs imagetest.Ext4) {
			s, _ := fs.Stat("/stolen")
			sh, _ := fs.Stat("/etc/shadow")
			if s.Number != sh.Number || fs.Cat("/stolen") != "root:image:\n" {
				t.Errorf("stolen is not the image's own /etc/shadow: %+v %+v", s, sh)
			}
		},
	}, {
		name:    "hard link to a host file the image lacks",
		img:     imageOf(t, L(E{Name: "stolen", Type: tar.TypeLink, Link: host.path})),
		refused: "not a file in the image",
	}, {
		name: "absolute symlink, then a file written through it",
		img: imageOf(t, L(
			E{Name: "evil", Type: tar.TypeSymlink, Link: hostDir},
			E{Name: "evil/host-secret", Body: []byte("pwned")},
		)),
		check: func(t *testing.T, fs imagetest.Ext4) {
			// Inside the guest the link is followed, from the guest's own root.
			if got := fs.Cat(hostDir + "/host-secret"); got != "pwned" {
				t.Errorf("guest view: %q", got)
			}
			if e, _ := fs.Stat("/evil"); e.Type != "symlink" {
				t.Errorf("evil: %+v", e)
			}
		},
	}, {
		name: "symlink in one layer, written through in the next",
		img: imageOf(t,
			L(E{Name: "evil", Type: tar.TypeSymlink, Link: hostDir}),
			L(E{Name: "evil/host-secret", Body: []byte("pwned")})),
		refused: "kiln does not follow links across layers",
	}, {
		name:    "a file over the size limit",
		img:     imageOf(t, L(E{Name: "big", Body: make([]byte, 65<<20)})),
		refused: "--image-max-size",
	}, {
		name:    "a gzip bomb",
		img:     imageOf(t, imagetest.GzipBomb(t, 200<<20)),
		refused: "--image-max-size",
	}, {
		name:    "a path longer than the limit",
		img:     imageOf(t, L(E{Name: strings.Repeat("d/", 2100) + "f"})),
		refused: "over the limit",
	}, {
		name:    "a path deeper than the limit",
		img:     imageOf(t, L(E{Name: strings.Repeat("a/", 300) + "f"})),
		refused: "directories deep",
	}, {
		name:    "deep paths whose directories outnumber the entry cap",
		img:     imageOf(t, L(deepEntries(60, 100)...)),
		refused: "more than 5000 files and directories",
	}, {
		name: "symbolic links that build a path longer than any entry may name",
		img: imageOf(t, L(
			E{Name: "l", Type: tar.TypeSymlink, Link: longDir},
			E{Name: longDir + "/m", Type: tar.TypeSymlink, Link: longDir},
			E{Name: "l/m/f", Body: []byte("x")})),
		refused: "through symbolic links",
	}, {
		name:    "an extended attribute name ext4 cannot store",
		img:     imageOf(t, L(E{Name: "x", Xattrs: map[string]string{"user." + strings.Repeat("n", 300): "v"}})),
		refused: "extended attributes",
	}, {
		name:    "a symbolic link target of 4096 bytes",
		img:     imageOf(t, L(E{Name: "s", Type: tar.TypeSymlink, Link: strings.Repeat("t", 4096)})),
		refused: "symbolic link with a target",
	}, {
		name:    "a device number Linux does not have",
		img:     imageOf(t, L(E{Name: "d", Type: tar.TypeBlock, Dev: [2]int64{5000, 1}})),
		refused: "outside Linux's device numbers",
	}, {
		name: "hard links to hard links to a lower layer's file",
		img: imageOf(t, L(E{Name: "a", Body: []byte("shared")}),
			L(E{Name: "c", Type: tar.TypeLink, Link: "b"}, E{Name: "b", Type: tar.TypeLink, Link: "a"})),
		check: func(t *testing.T, fs imagetest.Ext4) {
			a, _ := fs.Stat("/a")
			c, _ := fs.Stat("/c")
			if a.Number != c.Number || a.Links != 3 || fs.Cat("/c") != "shared" {
				t.Errorf("a %+v c %+v", a, c)
			}
		},
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := cache.Rootfs(context.Background(), c.img, nil)
			if c.refused != "" {
				if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), c.refused) {
					t.Errorf("err = %v, want an invalid-image error saying %q", err, c.refused)
				}
			} else if err != nil {
				t.Fatal(err)
			} else {
				fs := imagetest.Ext4{T: t, Path: r.Path}
				fs.Check()
				c.check(t, fs)
			}
			host.untouched(t)
			if l := leftovers(t, cacheDir); len(l) > 0 {
				t.Errorf("left in the cache: %v", l)
			}
			if _, err := os.Stat(other.Path); err != nil {
				t.Errorf("another image's root filesystem: %v", err)
			}
		})
	}
}

// longDir is a 3012-byte path of 12 directories.
var longDir = strings.TrimSuffix(strings.Repeat(strings.Repeat("y", 250)+"/", 12), "/")

// deepEntries is n files, each under its own chain of depth directories.
func deepEntries(n, depth int) []imagetest.Entry {
	var es []imagetest.Entry
	for i := 0; i < n; i++ {
		es = append(es, imagetest.Entry{Name: fmt.Sprintf("d%d/", i) + strings.Repeat("a/", depth) + "f"})
	}
	return es
}

// A registry that serves an image's genuine manifest with a different blob under the
// genuine layer digest cannot get its content cached under the genuine image's name:
// every layer is read to its end, where its digest is checked.
func TestTamperedLayerIsRefused(t *testing.T) {
	noise := make([]byte, 64<<10)
	rand.Read(noise)
	gz := func(body []byte) []byte {
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		tw := tar.NewWriter(zw)
		tw.WriteHeader(&tar.Header{Name: "app", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(body))})
		tw.Write(body)
		tw.Close()
		zw.Close()
		return buf.Bytes()
	}
	genuine := gz(append([]byte("GENUINE\n"), noise...))
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(genuine)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img := imageOf(t, l)
	manifest, _ := img.RawManifest()
	config, _ := img.RawConfigFile()
	configName, _ := img.ConfigName()
	layerDigest, _ := l.Digest()
	digest, _ := img.Digest()
	mediaType, _ := img.MediaType()
	evil := gz([]byte("EVIL\n"))
	evil = append(evil, make([]byte, len(genuine)-len(evil))...) // same size, padded after the gzip member

	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch p := r.URL.Path; {
		case p == "/v2/":
		case strings.HasPrefix(p, "/v2/x/manifests/"):
			w.Header().Set("Content-Type", string(mediaType))
			w.Header().Set("Docker-Content-Digest", digest.String())
			w.Write(manifest)
		case p == "/v2/x/blobs/"+configName.String():
			w.Write(config)
		case p == "/v2/x/blobs/"+layerDigest.String():
			w.Write(evil)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	ref, _ := name.ParseReference(strings.TrimPrefix(srv.URL, "http://")+"/x@"+digest.String(), name.Insecure)
	remoteImg, err := remote.Image(ref)
	if err != nil {
		t.Fatal(err)
	}
	cacheDir := t.TempDir()
	_, err = image.Cache{Dir: cacheDir}.Rootfs(context.Background(), remoteImg, nil)
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "does not match its digest") {
		t.Errorf("err = %v", err)
	}
	if ents, _ := os.ReadDir(cacheDir); len(ents) != 0 {
		t.Errorf("the cache holds %d entries", len(ents))
	}
}

// A 20 GiB sparse file made by GNU tar is refused at its header, before any byte of it
// is written: the ext4 writer would store it whole. A small one keeps its size.
func TestSparseFiles(t *testing.T) {
	cacheDir := t.TempDir()
	cache := image.Cache{Dir: cacheDir}
	_, err := cache.Rootfs(context.Background(), imageOf(t, imagetest.SparseLayer(t, 20<<30)), nil)
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "--image-max-size") {
		t.Errorf("err = %v", err)
	}
	if l := leftovers(t, cacheDir); len(l) > 0 {
		t.Errorf("left in the cache: %v", l)
	}
	r, err := cache.Rootfs(context.Background(), imageOf(t, imagetest.SparseLayer(t, 3<<20)), nil)
	if err != nil {
		t.Fatal(err)
	}
	if s, _ := (imagetest.Ext4{T: t, Path: r.Path}).Stat("/sparse"); s.Size != 3<<20 {
		t.Errorf("sparse: %+v", s)
	}
}

// Layers merge as an overlay shows them: an upper file hides a lower tree at its path,
// an opaque directory hides lower contents, whiteouts apply only below their layer, and a
// hard link whose target is in a lower layer still links.
func TestMergeSemantics(t *testing.T) {
	L := func(e ...imagetest.Entry) v1.Layer { return imagetest.Layer(t, e...) }
	type E = imagetest.Entry
	img := imageOf(t,
		L(E{Name: "tree/", Type: tar.TypeDir}, E{Name: "tree/deep", Body: []byte("lower")},
			E{Name: "opq/", Type: tar.TypeDir}, E{Name: "opq/old", Body: []byte("old")},
			E{Name: "keep", Body: []byte("keep")}, E{Name: "dir/", Type: tar.TypeDir, Mode: 0o700, UID: 7}),
		L(E{Name: "tree", Body: []byte("now a file")},
			E{Name: "opq/", Type: tar.TypeDir}, E{Name: "opq/.wh..wh..opq"}, E{Name: "opq/new", Body: []byte("new")},
			E{Name: "link", Type: tar.TypeLink, Link: "keep"},
			E{Name: "dir/inner", Body: []byte("in")},
			E{Name: ".wh.gone"}, E{Name: "gone", Body: []byte("same layer")}),
	)
	r, err := image.Cache{Dir: t.TempDir()}.Rootfs(context.Background(), img, nil)
	if err != nil {
		t.Fatal(err)
	}
	fs := imagetest.Ext4{T: t, Path: r.Path}
	fs.Check()
	if fs.Cat("/tree") != "now a file" {
		t.Error("tree is not the upper file")
	}
	if _, ok := fs.Stat("/opq/old"); ok {
		t.Error("the opaque directory kept a lower file")
	}
	if fs.Cat("/opq/new") != "new" || fs.Cat("/gone") != "same layer" {
		t.Error("the upper layer's own files are missing")
	}
	k, _ := fs.Stat("/keep")
	l, _ := fs.Stat("/link")
	if k.Number != l.Number || k.Links != 2 {
		t.Errorf("link to a lower layer's file: %+v %+v", k, l)
	}
	// A directory named only as a parent in the upper layer keeps the lower one's owner.
	if d, _ := fs.Stat("/dir"); d.Mode != 0o700 || d.UID != 7 {
		t.Errorf("dir: %+v", d)
	}
}

// An uploaded image tarball holding sparse entries is refused before anything is read
// from it: a few KiB would otherwise expand to gigabytes on the host's disk.
func TestTarballWithSparseEntriesIsRefused(t *testing.T) {
	for _, format := range []string{"gnu", "posix"} {
		dir := t.TempDir()
		os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755)
		os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644)
		os.WriteFile(filepath.Join(dir, "index.json"), []byte(`{"schemaVersion":2,"manifests":[]}`), 0o644)
		blob := filepath.Join(dir, "blobs", "sha256", strings.Repeat("a", 64))
		os.WriteFile(blob, nil, 0o644)
		if err := os.Truncate(blob, 2<<30); err != nil {
			t.Fatal(err)
		}
		tarPath := filepath.Join(t.TempDir(), "image.tar")
		if out, err := exec.Command("tar", "--sparse", "--format="+format, "-C", dir, "-cf", tarPath, ".").CombinedOutput(); err != nil {
			t.Fatalf("tar: %v %s", err, out)
		}
		before, _ := filepath.Glob(filepath.Join(os.TempDir(), "kiln-oci-*"))
		_, closeImg, err := image.OpenTarball(tarPath)
		closeImg()
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "sparse") {
			t.Errorf("%s: err = %v", format, err)
		}
		if after, _ := filepath.Glob(filepath.Join(os.TempDir(), "kiln-oci-*")); len(after) > len(before) {
			t.Errorf("%s: left %v", format, after)
		}
	}
}

// Whiteouts are held in memory until their layer ends, so their names count toward the
// limit on paths like any entry's.
func TestWhiteoutNamesCountTowardTheLimit(t *testing.T) {
	var es []imagetest.Entry
	for i := 0; i < 200; i++ {
		es = append(es, imagetest.Entry{Name: fmt.Sprintf("%s/.wh.%d", longDir, i)})
	}
	_, err := image.Cache{Dir: t.TempDir(), Limits: image.Limits{MaxNameBytes: 256 << 10}}.Rootfs(context.Background(), imageOf(t, imagetest.Layer(t, es...)), nil)
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "paths add up to more than") {
		t.Errorf("200 whiteouts of 3 KiB names against a 256 KiB limit: %v", err)
	}
}
