package build

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kilnhq/kiln/internal/buildcontext"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// DefaultGitTimeout bounds one git fetch and checkout where the server sets no other.
const DefaultGitTimeout = 5 * time.Minute

// GitOptions says how the host fetches a build context from git. The repository, its
// server and its refs are the caller's: git runs with nothing of the host's (no HOME,
// config, credentials or hooks), as an unprivileged user where there is one, and what it
// checks out meets the same limits as an uploaded context.
type GitOptions struct {
	// AllowFile lets git_url name a repository on this host (file://). Off by default:
	// such a URL reads whatever repository the fetching user can read.
	AllowFile bool
	// Timeout bounds the whole fetch and checkout; zero means DefaultGitTimeout.
	Timeout time.Duration
}

func (o GitOptions) timeout() time.Duration {
	if o.Timeout <= 0 {
		return DefaultGitTimeout
	}
	return o.Timeout
}

var (
	commitRE = regexp.MustCompile(`^[0-9a-f]{7,40}$`)
	refRE    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._/+-]*$`)
)

// remoteSchemes are the transports a git_url may use; file is added where the server
// allows it. Everything else (ext::, fd::, local paths, scp-like host:path) is refused:
// some run commands, the rest read the host's files.
var remoteSchemes = []string{"https", "http", "ssh", "git"}

// checkGitURL refuses what git would take as an option, a local path or a transport
// outside remoteSchemes, and file:// unless allowFile.
func checkGitURL(raw string, allowFile bool) error {
	u, err := url.Parse(raw)
	if err != nil || strings.HasPrefix(raw, "-") || u.Scheme == "" {
		return errdefs.Invalid("git_url %q is not a URL: use https://host/repo.git, ssh://host/repo.git or git://host/repo.git", raw)
	}
	scheme := strings.ToLower(u.Scheme)
	for _, s := range remoteSchemes {
		if scheme == s {
			if u.Host == "" {
				return errdefs.Invalid("git_url %q names no host", raw)
			}
			return nil
		}
	}
	if scheme == "file" {
		if !allowFile {
			return errdefs.Invalid("git_url %q: file:// URLs are refused: this server does not build from its own files (its operator can allow them with kiln server --build-git-allow-file)", raw)
		}
		return nil
	}
	return errdefs.Invalid("git_url %q: scheme %q is not supported: use https, http, ssh or git", raw, u.Scheme)
}

// checkGitRef refuses a ref git could take as an option or a revision expression.
func checkGitRef(ref string) error {
	if ref == "" || (refRE.MatchString(ref) && !strings.Contains(ref, "..") && !strings.HasSuffix(ref, ".lock") && !strings.HasSuffix(ref, "/")) {
		return nil
	}
	return errdefs.Invalid("git_ref %q is not a branch, tag or commit name", ref)
}

// gitConfigArgs is the configuration every git command runs with, given on the command
// line so that it wins over anything a repository's own config says.
func gitConfigArgs(allowFile bool) []string {
	file := "never"
	if allowFile {
		file = "always"
	}
	kv := []string{
		"credential.helper=",       // no stored credentials are offered to any server
		"core.hooksPath=/dev/null", // no hooks run
		"core.fsmonitor=false",     // a config-named command never runs
		"protocol.allow=never",     // transports are named one by one below
		"protocol.https.allow=always",
		"protocol.http.allow=always",
		"protocol.ssh.allow=always",
		"protocol.git.allow=always",
		"protocol.file.allow=" + file,
		// A redirect would take git wherever the repository's server says, an address
		// the caller could not name itself (the egress rules hold git's uid to the
		// policy, but a redirect to an allowed range is still not the caller's choice).
		"http.followRedirects=false",
		"submodule.recurse=false", // submodules are other repositories: not fetched
		"fetch.recurseSubmodules=false",
		"init.defaultBranch=kiln",
		"advice.detachedHead=false",
		"gc.auto=0",
	}
	args := make([]string, 0, 2*len(kv))
	for _, s := range kv {
		args = append(args, "-c", s)
	}
	return args
}

// gitSSH keeps ssh from the host's keys, agent, config and known hosts: a git_url over
// ssh gets an anonymous connection.
const gitSSH = "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityFile=/dev/null -o IdentityAgent=none -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"

// gitEnv is git's whole environment: nothing of the server's own (its HOME, SSH agent,
// GIT_* variables) reaches it.
func gitEnv(home string) []string {
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/bin:/usr/bin:/bin"
	}
	return []string{
		"PATH=" + path,
		"HOME=" + home,
		"XDG_CONFIG_HOME=" + home,
		"GIT_CONFIG_NOSYSTEM=1",
		"GIT_CONFIG_GLOBAL=/dev/null",
		"GIT_TERMINAL_PROMPT=0",
		"GIT_SSH_COMMAND=" + gitSSH,
		"LC_ALL=C",
	}
}

// GitUserName is the system user git runs as where the host has it (scripts/setup.sh
// creates it). A uid of git's own lets the network's rules hold git's traffic to the
// egress policy that machines get (network.Config.ConfineUIDs); nobody, the fallback,
// is shared with other services, so no rule can be written for it.
const GitUserName = "kiln-git"

// GitUser is who git runs as, and that user's name: GitUserName, or nobody where the
// host lacks it, when the server is root; nil and "" for the server's own user. Either
// way git reaches only world-readable repositories through file:// and writes nowhere
// but its own directory.
func GitUser() (*syscall.Credential, string) {
	if os.Geteuid() != 0 {
		return nil, ""
	}
	for _, name := range []string{GitUserName, "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
		gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
		if err1 != nil || err2 != nil || uid == 0 {
			continue
		}
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, name
	}
	return nil, ""
}

func gitUser() *syscall.Credential {
	c, _ := GitUser()
	return c
}

// gitRunner runs git commands in one checkout directory.
type gitRunner struct {
	dir, home string
	allowFile bool
	cred      *syscall.Credential
	// fileMax caps each file git writes (RLIMIT_FSIZE, through prlimit): a remote's
	// pack cannot fill the host's disk before the timeout.
	fileMax int64
	// uploadPack, for file:// only, lets the fetching user read a repository another
	// user owns (git refuses that by default, and the global config that could allow
	// it is /dev/null).
	uploadPack string
}

// command builds one git command.
func (g gitRunner) command(ctx context.Context, args ...string) *exec.Cmd {
	full := append(gitConfigArgs(g.allowFile), "-C", g.dir)
	name, full := "git", append(full, args...)
	if g.fileMax > 0 {
		name, full = "prlimit", append([]string{fmt.Sprintf("--fsize=%d", g.fileMax), "--", "git"}, full...)
	}
	cmd := exec.CommandContext(ctx, name, full...)
	cmd.Dir = g.dir
	cmd.Env = gitEnv(g.home)
	cmd.Stdin = nil
	// Its own process group: a timeout ends git's helpers (remote-https, ssh) too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: g.cred}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// run runs git and returns its stdout; a failure carries the end of its stderr.
func (g gitRunner) run(ctx context.Context, args ...string) ([]byte, error) {
	cmd := g.command(ctx, args...)
	var stdout bytes.Buffer
	stderr := &tailWriter{max: 4 << 10}
	cmd.Stdout, cmd.Stderr = &stdout, stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		// git itself, or the helper it ran (index-pack, unpack-objects), hit the cap.
		ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
		if (ws.Signaled() && ws.Signal() == syscall.SIGXFSZ) || bytes.Contains(stderr.buf, []byte(fmt.Sprintf("died of signal %d", syscall.SIGXFSZ))) {
			return nil, errdefs.Invalid("git %s wrote a file over %d MiB, more than a context within --build-max-context needs: the repository is too large to build from", args[0], g.fileMax>>20)
		}
		return nil, fmt.Errorf("git %s: %v: %s", args[0], err, strings.TrimSpace(string(stderr.buf)))
	}
	return stdout.Bytes(), nil
}

// tailWriter keeps the last max bytes written: a remote can print without end.
type tailWriter struct {
	buf []byte
	max int
}

func (t *tailWriter) Write(p []byte) (int, error) {
	t.buf = append(t.buf, p...)
	if len(t.buf) > t.max {
		t.buf = append(t.buf[:0], t.buf[len(t.buf)-t.max:]...)
	}
	return len(p), nil
}

// gitFetchPlan lists the fetches that get ref, tried in order until one works: shallow
// first (a branch, a tag, or a full commit id where the server serves commits by id),
// then, for what looks like a commit id, the remote's branches and tags in full, for an
// abbreviated id or a server that refuses a shallow fetch of a commit. checkout[i] names
// what to check out after fetch i.
func gitFetchPlan(ref, uploadPack string) (fetches [][]string, checkout []string) {
	fetch := func(extra ...string) []string {
		args := []string{"fetch", "-q", "--no-recurse-submodules"}
		if uploadPack != "" {
			args = append(args, "--upload-pack="+uploadPack)
		}
		return append(args, extra...)
	}
	if ref == "" {
		ref = "HEAD"
	}
	fetches = [][]string{fetch("--no-tags", "--depth", "1", "origin", ref)}
	checkout = []string{"FETCH_HEAD^{commit}"}
	if commitRE.MatchString(ref) {
		fetches = append(fetches, fetch("--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"))
		checkout = append(checkout, ref+"^{commit}")
	}
	return fetches, checkout
}

// fetchGit fetches ref (a branch, a tag or a commit; default the remote's HEAD) of the
// repository at gitURL into g.dir and checks it out, after checking that the tree fits
// the context limits: a tree larger than the limits is never written out. What git
// downloads is bounded per file by g.fileMax, and in time by the timeout.
func fetchGit(ctx context.Context, g gitRunner, gitURL, ref string, maxBytes int64) error {
	if _, err := g.run(ctx, "init", "-q", "--template=", "."); err != nil {
		return err
	}
	if _, err := g.run(ctx, "remote", "add", "origin", gitURL); err != nil {
		return err
	}
	fetches, checkouts := gitFetchPlan(ref, g.uploadPack)
	var err error
	for i, f := range fetches {
		if _, err = g.run(ctx, f...); err != nil {
			if ctx.Err() != nil {
				return err
			}
			continue
		}
		rev, rerr := g.run(ctx, "rev-parse", "--verify", "-q", checkouts[i])
		if rerr != nil {
			err = fmt.Errorf("%s is not a commit of the repository", ref)
			continue
		}
		commit := strings.TrimSpace(string(rev))
		if err := checkGitTree(ctx, g, commit, maxBytes); err != nil {
			return err
		}
		_, err = g.run(ctx, "checkout", "-q", "--detach", commit)
		return err
	}
	return err
}

// checkGitTree holds a commit's tree to the context limits before it is checked out.
func checkGitTree(ctx context.Context, g gitRunner, commit string, maxBytes int64) error {
	cmd := g.command(ctx, "ls-tree", "-r", "-t", "-l", "-z", "--full-tree", commit)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	stderr := &tailWriter{max: 4 << 10}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	var entries int
	var total int64
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	sc.Split(splitNUL)
	var limitErr error
	for sc.Scan() && limitErr == nil {
		// "<mode> <type> <object> <size>\t<path>"
		meta, _, _ := strings.Cut(sc.Text(), "\t")
		fields := strings.Fields(meta)
		entries++
		if len(fields) == 4 && fields[1] == "blob" {
			n, _ := strconv.ParseInt(fields[3], 10, 64)
			total += n
		}
		switch {
		case entries > buildcontext.MaxEntries:
			limitErr = errdefs.Invalid("the git checkout has more than %d entries, the most a build context may hold: build from a smaller repository", buildcontext.MaxEntries)
		case total > maxBytes:
			limitErr = errdefs.Invalid("the git checkout is larger than the %d MiB limit on a build context: build from a smaller repository, or raise the server's --build-max-context", maxBytes>>20)
		}
	}
	if limitErr == nil {
		limitErr = sc.Err()
	}
	if limitErr != nil {
		cmd.Cancel()
		cmd.Wait()
		return limitErr
	}
	if err := cmd.Wait(); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("git ls-tree: %v: %s", err, strings.TrimSpace(string(stderr.buf)))
	}
	return nil
}

func splitNUL(data []byte, atEOF bool) (int, []byte, error) {
	if i := bytes.IndexByte(data, 0); i >= 0 {
		return i + 1, data[:i], nil
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// cloneContext fetches the context of a git build into ctxDir, an empty directory. git
// works in a directory of its own under the system's temp dir, where the unprivileged
// user can reach it; what it checked out then goes through buildcontext.Extract, the same
// check as an uploaded context. kiln fetches on the host: builder VMs have no route to
// the repository. The .git directory is left out of the context.
func cloneContext(ctx context.Context, opts GitOptions, gitURL, ref, ctxDir string, maxBytes int64) error {
	if err := checkGitURL(gitURL, opts.AllowFile); err != nil {
		return err
	}
	if err := checkGitRef(ref); err != nil {
		return err
	}
	if _, err := exec.LookPath("git"); err != nil {
		return errdefs.Missing("git", "git")
	}
	if _, err := exec.LookPath("prlimit"); err != nil {
		return errdefs.Missing("prlimit", "util-linux")
	}
	stage, err := os.MkdirTemp("", "kiln-git-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stage)
	g := gitRunner{dir: filepath.Join(stage, "work"), home: filepath.Join(stage, "home"), allowFile: opts.AllowFile, cred: gitUser(),
		fileMax: 2*maxBytes + 1<<20}
	if strings.HasPrefix(strings.ToLower(gitURL), "file:") {
		g.uploadPack = "git -c safe.directory='*' upload-pack"
	}
	for _, d := range []string{g.dir, g.home} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return err
		}
		if g.cred != nil {
			if err := os.Chown(d, int(g.cred.Uid), int(g.cred.Gid)); err != nil {
				return err
			}
		}
	}
	if g.cred != nil {
		// The stage stays root's: the unprivileged user may enter it, not rename it.
		if err := os.Chmod(stage, 0o711); err != nil {
			return err
		}
	}
	gctx, cancel := context.WithTimeout(ctx, opts.timeout())
	err = fetchGit(gctx, g, gitURL, ref, maxBytes)
	cancel()
	if g.cred != nil {
		// Closed to the unprivileged user before kiln reads what it wrote.
		os.Chmod(stage, 0o700)
	}
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, context.DeadlineExceeded):
		return errdefs.Invalid("fetching the build context from %s (ref %q) took longer than %s, the server's --build-git-timeout", gitURL, ref, opts.timeout())
	case errors.Is(err, errdefs.ErrInvalid):
		return err
	default:
		return errdefs.Wrap(errdefs.ErrInvalid, err, "fetching the build context from %s (ref %q)", gitURL, ref)
	}
	pr, pw := io.Pipe()
	written := make(chan struct{})
	go func() {
		defer close(written)
		pw.CloseWithError(buildcontext.WriteTar(pw, g.dir, func(rel string, isDir bool) (bool, bool) {
			return rel == ".git", rel == ".git" && isDir
		}))
	}()
	_, err = buildcontext.Extract(pr, ctxDir, maxBytes)
	pr.CloseWithError(io.ErrClosedPipe) // ends WriteTar if Extract stopped early
	<-written
	if err != nil {
		return fmt.Errorf("the git checkout of %s: %w", gitURL, err)
	}
	return nil
}
