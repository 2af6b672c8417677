package build

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
)

var commitRE = regexp.MustCompile(`^[0-9a-f]{7,40}$`)

// checkGitURL refuses what git would take as an option or a local path outside file://.
func checkGitURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || strings.HasPrefix(raw, "-") {
		return errdefs.Invalid("git_url %q is not a URL: use https://host/repo.git, ssh://..., or file:///path", raw)
	}
	switch u.Scheme {
	case "https", "http", "ssh", "git", "file":
		return nil
	}
	return errdefs.Invalid("git_url %q: scheme %q is not supported: use https, http, ssh, git or file", raw, u.Scheme)
}

// cloneContext checks out ref (a branch, a tag or a commit; default the remote's HEAD)
// of the repository into dir, which becomes the build context. kiln fetches on the host:
// builder VMs have no network. The .git directory is left out of the context.
func cloneContext(ctx context.Context, gitURL, ref, dir string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	git := func(args ...string) error {
		cmd := exec.CommandContext(ctx, "git", args...)
		cmd.Env = append(os.Environ(), "GIT_TERMINAL_PROMPT=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("git %s: %v: %s", args[0], err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	if _, err := exec.LookPath("git"); err != nil {
		return errdefs.Missing("git", "git")
	}
	var err error
	switch {
	case ref == "":
		err = git("clone", "--depth", "1", "--", gitURL, dir)
	case commitRE.MatchString(ref):
		if err = git("clone", "--", gitURL, dir); err == nil {
			err = git("-C", dir, "checkout", "--detach", ref)
		}
	default:
		err = git("clone", "--depth", "1", "--branch", ref, "--", gitURL, dir)
	}
	if err != nil {
		return errdefs.Invalid("fetching the build context from %s (ref %q): %v", gitURL, ref, err)
	}
	return os.RemoveAll(dir + "/.git")
}
