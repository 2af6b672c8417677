package buildcontext_test

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/buildcontext"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// writeFiles creates files under dir; a name ending in / is a directory.
func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, data := range files {
		p := filepath.Join(dir, name)
		if strings.HasSuffix(name, "/") {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// tarNames lists the entry names of a tar stream, sorted.
func tarNames(t *testing.T, b []byte) []string {
	t.Helper()
	var names []string
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, hdr.Name)
	}
	sort.Strings(names)
	return names
}

// A mistake in the local context is an invalid argument that names the path, said
// before anything is sent, and never blamed on a server.
func TestOpenRefusesLocalMistakes(t *testing.T) {
	root := t.TempDir()
	ctx := filepath.Join(root, "ctx")
	writeFiles(t, root, map[string]string{"ctx/Dockerfile": "FROM x\n", "ctx/sub/": "", "file": "x", "bad/Dockerfile": "FROM x\n", "bad/.dockerignore": "[\n"})
	for _, c := range []struct {
		name, dir, dockerfile string
		want                  []string
	}{
		{"missing directory", filepath.Join(root, "nonexistent"), "", []string{filepath.Join(root, "nonexistent"), "does not exist", "kiln build ."}},
		{"a file, not a directory", filepath.Join(root, "file"), "", []string{filepath.Join(root, "file"), "is not a directory"}},
		{"no Dockerfile", filepath.Join(ctx, "sub"), "", []string{filepath.Join(ctx, "sub", "Dockerfile"), "--file"}},
		{"--file missing", ctx, "Dockerfile.dev", []string{filepath.Join(ctx, "Dockerfile.dev"), "--file"}},
		{"--file a directory", ctx, "sub", []string{filepath.Join(ctx, "sub"), "is a directory", "--file"}},
		{"--file outside the context", ctx, "../file", []string{"../file", "inside the context"}},
		{"bad .dockerignore", filepath.Join(root, "bad"), "", []string{filepath.Join(root, "bad", ".dockerignore")}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := buildcontext.Open(c.dir, c.dockerfile)
			if !errors.Is(err, errdefs.ErrInvalid) {
				t.Fatalf("got %v, want an invalid-argument error", err)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%q does not say %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "server") {
				t.Errorf("%q mentions a server for a local mistake", err)
			}
		})
	}
}

// .dockerignore leaves files and whole directories out, a ! pattern brings a file back,
// and the Dockerfile and .dockerignore are sent even when they match.
func TestWriteTarHonoursDockerignore(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{
		"build/Dockerfile.dev": "FROM x\n",
		".dockerignore":        "node_modules\n*.log\n!keep.log\nbuild\n.dockerignore\n",
		"node_modules/a/b.js":  "x",
		"debug.log":            "x",
		"keep.log":             "x",
		"src/main.go":          "package main\n",
	})
	if err := os.Symlink("src/main.go", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	// A socket is nothing a build can use: left out, not an error.
	ln, err := net.Listen("unix", filepath.Join(dir, "sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	d, err := buildcontext.Open(dir, "build/Dockerfile.dev")
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := d.WriteTar(&buf); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(tarNames(t, buf.Bytes()), " ")
	want := ".dockerignore build/Dockerfile.dev keep.log link src/ src/main.go"
	if got != want {
		t.Errorf("sent %s\nwant %s", got, want)
	}
}

// What WriteTar writes, Extract reads back: contents, modes and symlinks.
func TestWriteThenExtract(t *testing.T) {
	src := t.TempDir()
	writeFiles(t, src, map[string]string{"Dockerfile": "FROM x\n", "a/b/c.txt": "hello", "empty/": ""})
	if err := os.Chmod(filepath.Join(src, "a/b/c.txt"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("a/b/c.txt", filepath.Join(src, "l")); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := buildcontext.WriteTar(&buf, src, nil); err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	n, err := buildcontext.Extract(&buf, dst, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(len("FROM x\n")+len("hello")) {
		t.Errorf("Extract counted %d bytes", n)
	}
	if b, err := os.ReadFile(filepath.Join(dst, "a/b/c.txt")); err != nil || string(b) != "hello" {
		t.Errorf("a/b/c.txt: %q, %v", b, err)
	}
	if fi, err := os.Stat(filepath.Join(dst, "a/b/c.txt")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("a/b/c.txt mode: %v, %v", fi, err)
	}
	if l, err := os.Readlink(filepath.Join(dst, "l")); err != nil || l != "a/b/c.txt" {
		t.Errorf("symlink: %q, %v", l, err)
	}
	if fi, err := os.Stat(filepath.Join(dst, "empty")); err != nil || !fi.IsDir() {
		t.Errorf("empty directory: %v", err)
	}
}

// The rule for where the Dockerfile may be, which the CLI and the server share.
func TestDockerfilePath(t *testing.T) {
	for in, want := range map[string]string{"": "Dockerfile", "./build/../Dockerfile.dev": "Dockerfile.dev", "a/b": "a/b"} {
		if got, err := buildcontext.DockerfilePath(in); err != nil || got != want {
			t.Errorf("DockerfilePath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"/etc/passwd", "..", "../x", "a/../../x"} {
		if _, err := buildcontext.DockerfilePath(in); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("DockerfilePath(%q): %v, want invalid", in, err)
		}
	}
}
