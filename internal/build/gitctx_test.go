package build_test

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/testutil"
)

// submitOnly is a build service that takes submissions and runs nothing: what Submit
// checks needs no VM.
func submitOnly(t *testing.T, git build.GitOptions) *build.Service {
	t.Helper()
	dir := testutil.TempDir(t)
	db, err := sqlstore.Open(context.Background(), filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	base, _ := random.Image(256, 1)
	reg := &registry{base: base, pushed: map[string]v1.Image{}, dir: dir}
	return &build.Service{Store: db, Images: reg, Dir: filepath.Join(dir, "builds"), MaxContextBytes: 1 << 20, MaxLogBytes: 1 << 20, Git: git}
}

// readableRepo makes a git repository of files in a directory anyone may read (git
// fetches as an unprivileged user).
func readableRepo(t *testing.T, files map[string][]byte) string {
	t.Helper()
	repo := testutil.TempDir(t)
	os.Chmod(repo, 0o755)
	for name, body := range files {
		os.MkdirAll(filepath.Dir(filepath.Join(repo, name)), 0o755)
		os.WriteFile(filepath.Join(repo, name), body, 0o644)
	}
	for _, args := range [][]string{{"init", "-q", "-b", "main"}, {"add", "."}, {"-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x"}} {
		if out, err := exec.Command("git", append([]string{"-C", repo}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v %s", args, err, out)
		}
	}
	return repo
}

// stagedGitDirs lists git's working directories under the temp dir.
func stagedGitDirs() map[string]bool {
	m, _ := filepath.Glob(filepath.Join(os.TempDir(), "kiln-git-*"))
	out := map[string]bool{}
	for _, d := range m {
		out[d] = true
	}
	return out
}

// A git checkout meets the context limits: a repository whose files exceed
// --build-max-context is refused with the limit named, and nothing of it stays.
func TestGitContextLimits(t *testing.T) {
	big := make([]byte, 2<<20)
	rand.Read(big)
	repo := readableRepo(t, map[string][]byte{"Dockerfile": []byte("FROM localhost/busybox:1\n"), "big.bin": big})
	svc := submitOnly(t, build.GitOptions{AllowFile: true})
	before := stagedGitDirs()
	_, err := svc.Submit(context.Background(), "shop", api.BuildSpec{GitURL: "file://" + repo, GitRef: "main"}, ctxTar(nil), nil)
	if err == nil || !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "git checkout is larger than the 1 MiB limit") {
		t.Fatalf("a 2 MiB checkout against a 1 MiB limit: %v", err)
	}
	if ents, _ := os.ReadDir(svc.Dir); len(ents) != 0 {
		t.Errorf("the refused build left %d entries in %s", len(ents), svc.Dir)
	}
	for d := range stagedGitDirs() {
		if !before[d] {
			t.Errorf("git's working directory %s was left behind", d)
		}
	}
	// A download larger than any context within the limit needs is cut off while git
	// writes it, before it can fill the host's disk.
	huge := make([]byte, 4<<20)
	rand.Read(huge)
	hugeRepo := readableRepo(t, map[string][]byte{"Dockerfile": []byte("FROM localhost/busybox:1\n"), "huge.bin": huge})
	_, err = svc.Submit(context.Background(), "shop", api.BuildSpec{GitURL: "file://" + hugeRepo, GitRef: "main"}, ctxTar(nil), nil)
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "too large to build from") {
		t.Errorf("a 4 MiB pack against a 1 MiB limit: %v", err)
	}
	// Within the limit, the same repository is accepted without .git.
	small := readableRepo(t, map[string][]byte{"Dockerfile": []byte("FROM localhost/busybox:1\n"), "sub/a": []byte("a")})
	b, err := svc.Submit(context.Background(), "shop", api.BuildSpec{GitURL: "file://" + small}, ctxTar(nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctxDir := filepath.Join(svc.BuildDir(b.ID), "context")
	if got, _ := os.ReadFile(filepath.Join(ctxDir, "sub/a")); string(got) != "a" {
		t.Errorf("the checkout's sub/a: %q", got)
	}
	if _, err := os.Lstat(filepath.Join(ctxDir, ".git")); err == nil {
		t.Error("the context holds .git")
	}
}

// file:// reads the server's own files: refused unless the operator allows it, and then
// only what the unprivileged git user may read.
func TestGitFileURLs(t *testing.T) {
	repo := readableRepo(t, map[string][]byte{"Dockerfile": []byte("FROM localhost/busybox:1\n")})
	spec := api.BuildSpec{GitURL: "file://" + repo}
	_, err := submitOnly(t, build.GitOptions{}).Submit(context.Background(), "shop", spec, ctxTar(nil), nil)
	if err == nil || !strings.Contains(err.Error(), "--build-git-allow-file") {
		t.Fatalf("file:// without --build-git-allow-file: %v", err)
	}
	if _, err := submitOnly(t, build.GitOptions{AllowFile: true}).Submit(context.Background(), "shop", spec, ctxTar(nil), nil); err != nil {
		t.Fatalf("file:// with --build-git-allow-file: %v", err)
	}
	if os.Geteuid() == 0 {
		os.Chmod(repo, 0o700)
		_, err := submitOnly(t, build.GitOptions{AllowFile: true}).Submit(context.Background(), "shop", spec, ctxTar(nil), nil)
		if err == nil || !strings.Contains(err.Error(), "fetching the build context") {
			t.Fatalf("a repository only root may read was fetched: %v", err)
		}
	}
}

// The server's own git configuration (here a hook in HOME's .gitconfig) does not apply
// to a build's fetch.
func TestGitIgnoresServerConfig(t *testing.T) {
	home := testutil.TempDir(t)
	os.Chmod(home, 0o755)
	marker := filepath.Join(home, "hook-ran")
	hooks := filepath.Join(home, "hooks")
	os.Mkdir(hooks, 0o755)
	os.WriteFile(filepath.Join(hooks, "post-checkout"), []byte("#!/bin/sh\ntouch "+marker+"\n"), 0o755)
	os.WriteFile(filepath.Join(home, ".gitconfig"), []byte("[core]\n\thooksPath = "+hooks+"\n"), 0o644)
	t.Setenv("HOME", home)
	repo := readableRepo(t, map[string][]byte{"Dockerfile": []byte("FROM localhost/busybox:1\n")})
	if _, err := submitOnly(t, build.GitOptions{AllowFile: true}).Submit(context.Background(), "shop", api.BuildSpec{GitURL: "file://" + repo}, ctxTar(nil), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Error("a hook from the server's HOME ran during the fetch")
	}
}

// A build may not name another project's image as its base.
func TestSubmitRefusesAnotherProjectsBase(t *testing.T) {
	svc := submitOnly(t, build.GitOptions{})
	_, err := svc.Submit(context.Background(), "shop", api.BuildSpec{}, ctxTar(map[string]string{"Dockerfile": "FROM localhost/other/base:1\n"}), nil)
	if err == nil || !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "belongs to project other") {
		t.Fatalf("FROM another project's image: %v", err)
	}
}
