package build

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
)

func TestCheckGitURL(t *testing.T) {
	for _, c := range []struct {
		url       string
		allowFile bool
		want      string // "" accepted, else part of the error
	}{
		{"https://example.com/r.git", false, ""},
		{"http://example.com/r.git", false, ""},
		{"ssh://git@example.com/r.git", false, ""},
		{"git://example.com/r.git", false, ""},
		{"file:///srv/repo", false, "--build-git-allow-file"},
		{"FILE:///srv/repo", false, "--build-git-allow-file"},
		{"file:///srv/repo", true, ""},
		{"/srv/repo", true, "is not a URL"},
		{"./repo", true, "is not a URL"},
		{"git@example.com:r.git", true, "is not a URL"},
		{"ext::sh -c touch% /tmp/pwned", true, `scheme "ext" is not supported`},
		{"fd::3", true, `scheme "fd" is not supported`},
		{"--upload-pack=touch /tmp/x", true, "is not a URL"},
		{"https:///r.git", false, "names no host"},
	} {
		err := checkGitURL(c.url, c.allowFile)
		if c.want == "" && err != nil || c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, errdefs.ErrInvalid)) {
			t.Errorf("checkGitURL(%q, allowFile=%v) = %v, want %q", c.url, c.allowFile, err, c.want)
		}
	}
	for _, ref := range []string{"--upload-pack=x", "main..dev", "a:b", "HEAD~1", "x.lock", "@{-1}"} {
		if checkGitRef(ref) == nil {
			t.Errorf("ref %q accepted", ref)
		}
	}
	for _, ref := range []string{"", "main", "v1.2.3", "feature/x", "0123abc", strings.Repeat("a", 40)} {
		if err := checkGitRef(ref); err != nil {
			t.Errorf("ref %q: %v", ref, err)
		}
	}
}

// git gets nothing of the server's: its whole environment and configuration are kiln's.
func TestGitCommandIsolation(t *testing.T) {
	t.Setenv("SSH_AUTH_SOCK", "/run/agent.sock")
	t.Setenv("GIT_DIR", "/etc")
	home := t.TempDir()
	for _, allowFile := range []bool{false, true} {
		g := gitRunner{dir: "/work", home: home, allowFile: allowFile}
		cmd := g.command(context.Background(), "fetch", "origin")
		env := map[string]string{}
		for _, kv := range cmd.Env {
			k, v, _ := strings.Cut(kv, "=")
			env[k] = v
		}
		for k, want := range map[string]string{"HOME": home, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_TERMINAL_PROMPT": "0"} {
			if env[k] != want {
				t.Errorf("%s=%q, want %q", k, env[k], want)
			}
		}
		for _, k := range []string{"SSH_AUTH_SOCK", "GIT_DIR"} {
			if _, ok := env[k]; ok {
				t.Errorf("the server's %s reaches git", k)
			}
		}
		if !strings.Contains(env["GIT_SSH_COMMAND"], "-F /dev/null") || !strings.Contains(env["GIT_SSH_COMMAND"], "IdentityAgent=none") {
			t.Errorf("ssh may use the host's keys or config: %q", env["GIT_SSH_COMMAND"])
		}
		file := "protocol.file.allow=never"
		if allowFile {
			file = "protocol.file.allow=always"
		}
		for _, want := range []string{"credential.helper=", "core.hooksPath=/dev/null", "protocol.allow=never", file, "submodule.recurse=false", "fetch.recurseSubmodules=false", "http.followRedirects=false"} {
			i := slices.Index(cmd.Args, want)
			if i < 1 || cmd.Args[i-1] != "-c" {
				t.Errorf("allowFile=%v: git runs without -c %s: %q", allowFile, want, cmd.Args)
			}
		}
		if last := cmd.Args[len(cmd.Args)-2:]; !slices.Equal(last, []string{"fetch", "origin"}) {
			t.Errorf("the command ends %q", last)
		}
		if !cmd.SysProcAttr.Setpgid {
			t.Error("git does not run in its own process group: a timeout would leave its helpers")
		}
	}
	if os.Geteuid() == 0 {
		if c := gitUser(); c == nil || c.Uid == 0 {
			t.Errorf("as root, git runs as %+v, want an unprivileged user", c)
		}
	}
}

func TestGitFetchPlan(t *testing.T) {
	sha := strings.Repeat("ab", 20)
	for _, c := range []struct {
		ref       string
		fetches   int
		shallowOf string
	}{
		{"", 1, "HEAD"},
		{"main", 1, "main"},
		{"v1.0", 1, "v1.0"},
		{sha, 2, sha},         // shallow first, then everything for servers that refuse
		{sha[:8], 2, sha[:8]}, // an abbreviated id (or a branch that looks like one)
	} {
		fetches, checkouts := gitFetchPlan(c.ref, "")
		if len(fetches) != c.fetches || len(checkouts) != c.fetches {
			t.Errorf("%q: %d fetches, want %d: %q", c.ref, len(fetches), c.fetches, fetches)
			continue
		}
		first := fetches[0]
		if !slices.Contains(first, "--depth") || first[len(first)-1] != c.shallowOf {
			t.Errorf("%q: the first fetch is not shallow of %s: %q", c.ref, c.shallowOf, first)
		}
		if c.fetches == 2 && (slices.Contains(fetches[1], "--depth") || checkouts[1] != c.ref+"^{commit}") {
			t.Errorf("%q: the fallback is %q then %q", c.ref, fetches[1], checkouts[1])
		}
	}
}

// gitRepo makes a repository with two commits of file msg ("one", "two") in a directory
// the unprivileged git user can read, and returns it with the first commit's id.
func gitRepo(t *testing.T) (dir, first string) {
	t.Helper()
	dir = t.TempDir()
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(dir), 0o755)
	git := func(args ...string) string {
		out, err := exec.Command("git", append([]string{"-C", dir, "-c", "user.name=t", "-c", "user.email=t@t"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("git %v: %v %s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	git("init", "-q", "-b", "main")
	os.WriteFile(filepath.Join(dir, "msg"), []byte("one\n"), 0o644)
	git("add", ".")
	git("commit", "-q", "-m", "one")
	first = git("rev-parse", "HEAD")
	os.WriteFile(filepath.Join(dir, "msg"), []byte("two\n"), 0o644)
	git("commit", "-q", "-am", "two")
	return dir, first
}

// newRunner prepares a checkout directory as cloneContext does.
func newRunner(t *testing.T) gitRunner {
	t.Helper()
	stage := t.TempDir()
	os.Chmod(stage, 0o711)
	g := gitRunner{dir: filepath.Join(stage, "work"), home: filepath.Join(stage, "home"), allowFile: true, cred: gitUser(),
		uploadPack: "git -c safe.directory='*' upload-pack"}
	for _, d := range []string{g.dir, g.home} {
		os.Mkdir(d, 0o700)
		if g.cred != nil {
			os.Chown(d, int(g.cred.Uid), int(g.cred.Gid))
		}
	}
	return g
}

// A branch is fetched shallow; a commit that the server will not serve by id (protocol
// v0 without allowAnySHA1InWant) is still found by the full fetch.
func TestGitFetchShallowAndFallback(t *testing.T) {
	repo, first := gitRepo(t)
	ctx := context.Background()

	g := newRunner(t)
	if err := fetchGit(ctx, g, "file://"+repo, "main", 1<<20); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(g.dir, "msg")); string(b) != "two\n" {
		t.Errorf("main checked out %q", b)
	}
	if out, _ := g.run(ctx, "rev-parse", "--is-shallow-repository"); strings.TrimSpace(string(out)) != "true" {
		t.Errorf("the fetch of a branch is not shallow: %s", out)
	}

	g = newRunner(t)
	g.uploadPack = "env -u GIT_PROTOCOL " + g.uploadPack // the server speaks protocol v0
	if err := fetchGit(ctx, g, "file://"+repo, first, 1<<20); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(g.dir, "msg")); string(b) != "one\n" {
		t.Errorf("commit %s checked out %q", first, b)
	}
}

// A repository's server cannot send git on to another address: a redirect, even on the
// first request, is not followed.
func TestGitRedirectNotFollowed(t *testing.T) {
	var elsewhere atomic.Int32
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		elsewhere.Add(1)
		http.NotFound(w, r)
	}))
	defer target.Close()
	var asked atomic.Int32
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		http.Redirect(w, r, target.URL+r.URL.RequestURI(), http.StatusFound)
	}))
	defer redirector.Close()
	// As the test's own user: the egress rules, where they exist, hold git's uid to the
	// policy, which a listener on loopback is outside of.
	g := gitRunner{dir: t.TempDir(), home: t.TempDir()}
	err := fetchGit(context.Background(), g, redirector.URL+"/repo.git", "main", 1<<20)
	if err == nil {
		t.Fatal("a fetch answered only by a redirect succeeded")
	}
	if asked.Load() == 0 {
		t.Fatalf("git never asked the repository's server: %v", err)
	}
	if n := elsewhere.Load(); n != 0 {
		t.Errorf("git followed the redirect: the other server got %d requests (%v)", n, err)
	}
}

// A remote that never answers is cut off at the timeout, helpers included.
func TestGitFetchTimeout(t *testing.T) {
	repo, _ := gitRepo(t)
	g := newRunner(t)
	g.uploadPack = "sleep 60 #"
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := fetchGit(ctx, g, "file://"+repo, "main", 1<<20)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("fetch from a remote that hangs: %v", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("the fetch ended %s after its 500 ms timeout", d)
	}
}
