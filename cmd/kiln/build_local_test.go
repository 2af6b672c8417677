package main_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A mistake on the caller's side of `kiln build` (the context, the Dockerfile, a secret's
// file) is reported as that mistake, naming the path, with the invalid-argument exit
// status, before any server is asked: never as a server that cannot be reached. No VM.
func TestBuildLocalMistakes(t *testing.T) {
	buildKiln(t)
	e := &env{t: t, dataDir: t.TempDir()}
	root := t.TempDir()
	ctx := filepath.Join(root, "ctx")
	if err := os.MkdirAll(ctx, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ctx, "Dockerfile"), []byte("FROM localhost/busybox:1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dead := []string{"--project", "p", "--api-url", "http://127.0.0.1:1"} // nothing listens there
	missing := filepath.Join(root, "nonexistent")
	for _, c := range []struct {
		name string
		args []string
		want []string
	}{
		{"missing context", []string{missing}, []string{missing, "does not exist", "kiln build ."}},
		{"context is a file", []string{filepath.Join(ctx, "Dockerfile")}, []string{filepath.Join(ctx, "Dockerfile"), "is not a directory"}},
		{"missing -f Dockerfile", []string{ctx, "-f", "Dockerfile.dev"}, []string{filepath.Join(ctx, "Dockerfile.dev"), "--file"}},
		{"unreadable --secret src", []string{ctx, "--secret", "id=tok,src=" + missing}, []string{"--secret tok", missing, "no such file"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, errs, code := e.run("", append(append([]string{"build"}, c.args...), dead...)...)
			if code != 2 {
				t.Errorf("exit %d, want 2 (invalid argument): %s", code, errs)
			}
			for _, w := range c.want {
				if !strings.Contains(errs, w) {
					t.Errorf("stderr does not say %q: %s", w, errs)
				}
			}
			if strings.Contains(errs, "server") {
				t.Errorf("a local mistake blamed on the server: %s", errs)
			}
		})
	}
	// The same command with nothing wrong locally does reach for the server: the
	// checks above are not what stops it.
	_, errs, code := e.run("", append([]string{"build", ctx}, dead...)...)
	if code != 1 || !strings.Contains(errs, "cannot reach the kiln server") {
		t.Errorf("a good context with no server: exit %d, %s", code, errs)
	}
}
