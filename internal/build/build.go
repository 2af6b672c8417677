// Package build runs Docker builds in per-project builder VMs. A build is queued with
// its context; the queue runs one build per project at a time on that project's
// builder, whose BuildKit cache lives on a volume only that project's VM mounts, and
// pushes the image to kiln's registry. Failures of the code fail the build at once;
// failures of the infrastructure (the builder died, buildkitd went away, kiln
// restarted) are retried with backoff. Every state change is one compare-and-swap in
// the store (Transition), and the queue survives restarts because it is the store.
package build

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerfile/shell"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/buildcontext"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/serverlog"
	"github.com/kilnhq/kiln/internal/store"
)

// Build states.
const (
	Queued    = "queued"
	Running   = "running"
	Succeeded = "succeeded"
	Failed    = "failed"
	Canceled  = "canceled"
)

// transitions lists every state change a build may make.
var transitions = map[string][]string{
	Queued:  {Running, Canceled},
	Running: {Succeeded, Failed, Canceled, Queued}, // Queued: an infrastructure retry
}

// CheckTransition refuses a state change the table does not list.
func CheckTransition(from, to string) error {
	for _, t := range transitions[from] {
		if t == to {
			return nil
		}
	}
	return errdefs.New(errdefs.ErrConflict, "a build cannot go from %s to %s", from, to)
}

// Terminal says whether a build in state s is done.
func Terminal(s string) bool { return s == Succeeded || s == Failed || s == Canceled }

// Images is kiln's registry as builds use it.
type Images interface {
	Resolve(ctx context.Context, ref string) (v1.Image, error)
	// Push stores img under refs and returns its digest and the refs as stored; only
	// the blobs the registry lacks are sent.
	Push(ctx context.Context, img v1.Image, refs ...string) (string, []string, error)
	// Delete removes a manifest (REPO@DIGEST) from kiln's registry.
	Delete(ctx context.Context, ref string) error
}

// Service queues and runs builds.
type Service struct {
	Store    store.Builds
	Builders *Builders
	Bases    *Bases
	Images   Images
	// Dir holds each build's context, log and output (Dir/ID).
	Dir             string
	MaxContextBytes int64
	MaxLogBytes     int64
	// MaxImageBytes bounds what a build's builder sends for its image; zero means 8 GiB.
	MaxImageBytes int64
	// Git says how contexts from git_url are fetched.
	Git GitOptions
	// MayPull decides whether a project's builds may use an image of kiln's registry as
	// a base; nil means OwnOrShared.
	MayPull func(project, ref string) error
	// MayTag decides whether a project's builds may push an image under ref; nil
	// means under the project's namespace (localhost/PROJECT/...) only.
	MayTag func(project, ref string) error
	// MaxAttempts bounds runs of a build whose infrastructure fails; Backoff is the
	// first wait before a retry, doubled each time.
	MaxAttempts int
	Backoff     time.Duration
	// MaxConcurrent bounds builds running at once (each on its own project's builder).
	MaxConcurrent int
	// KeepImages is how many of a project's newest build images stay in the registry;
	// older ones are pruned. Zero keeps all.
	KeepImages int
	// Log takes the service's lines; a line about an API call carries its request id.
	// Nil logs nothing.
	Log *slog.Logger
	// Host names this host when several share the database: it claims builds for itself,
	// prefers those whose project's cache it holds, and takes over the builds of a host
	// whose heartbeat stopped. Hosts lists them; both unset on a single host.
	Host  string
	Hosts store.Hosts

	mu      sync.Mutex
	running map[string]context.CancelFunc
	secrets map[string]map[string][]byte // build ID → secrets, in memory only
	reasons map[string]string            // build ID → why it is being canceled
	wake    chan struct{}
	wg      sync.WaitGroup // attempts and idle checks under way
	idling  atomic.Bool
}

func (s *Service) logf(format string, args ...any) { s.logfFor(context.Background(), format, args...) }

// logfFor logs a line about what ctx is doing: an API call's lines carry its id.
func (s *Service) logfFor(ctx context.Context, format string, args ...any) {
	serverlog.For(ctx, s.Log).Info(fmt.Sprintf("builds: "+format, args...))
}

var projectRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// ValidProject checks a project name.
func ValidProject(p string) error {
	if !projectRE.MatchString(p) {
		return errdefs.Invalid("project name %q: use 1 to 63 lowercase letters, digits and dashes, starting with a letter or digit", p)
	}
	return nil
}

func newID() string {
	var b [6]byte
	rand.Read(b[:])
	return "b" + hex.EncodeToString(b[:])
}

// BuildDir is where a build keeps its context, log and output.
func (s *Service) BuildDir(id string) string { return filepath.Join(s.Dir, id) }

// LogPath is a build's log.
func (s *Service) LogPath(id string) string { return filepath.Join(s.BuildDir(id), "log") }

// Submit checks a build, unpacks its context and queues it. Everything that can be
// checked without a VM is checked here, so bad input fails before any builder starts.
func (s *Service) Submit(ctx context.Context, project string, spec api.BuildSpec, contextTar io.Reader, secrets map[string][]byte) (api.Build, error) {
	if err := ValidProject(project); err != nil {
		return api.Build{}, err
	}
	df, err := buildcontext.DockerfilePath(spec.Dockerfile)
	if err != nil {
		return api.Build{}, err
	}
	spec.Dockerfile = df
	id := newID()
	if len(spec.Tags) == 0 {
		spec.Tags = []string{"localhost/" + project + "/build:" + id}
	}
	mayTag := s.MayTag
	if mayTag == nil {
		mayTag = OwnNamespace
	}
	for _, t := range spec.Tags {
		if _, err := image.NormalizeRef(t); err != nil || strings.Contains(t, "@") {
			return api.Build{}, errdefs.Invalid("tag %q is not a valid image reference: use NAME[:TAG], like localhost/%s/web:v2", t, project)
		}
		if err := mayTag(project, t); err != nil {
			return api.Build{}, errdefs.Wrap(errdefs.ErrInvalid, err, "tag %s is outside project %s", t, project)
		}
	}
	for k := range spec.BuildArgs {
		if k == "" || strings.ContainsAny(k, "= ") {
			return api.Build{}, errdefs.Invalid("build arg %q is not a valid name", k)
		}
	}
	spec.SecretIDs = nil
	for k := range secrets {
		spec.SecretIDs = append(spec.SecretIDs, k)
	}
	sort.Strings(spec.SecretIDs)

	dir := s.BuildDir(id)
	ctxDir := filepath.Join(dir, "context")
	if err := os.MkdirAll(ctxDir, 0o755); err != nil {
		return api.Build{}, err
	}
	fail := func(err error) (api.Build, error) {
		os.RemoveAll(dir)
		return api.Build{}, err
	}
	if _, err := buildcontext.Extract(contextTar, ctxDir, s.MaxContextBytes); err != nil {
		return fail(err)
	}
	if spec.GitURL != "" {
		if ents, _ := os.ReadDir(ctxDir); len(ents) > 0 {
			return fail(errdefs.Invalid("a build takes its context from git_url or from the request, not both"))
		}
		if err := cloneContext(ctx, s.Git, spec.GitURL, spec.GitRef, ctxDir, s.MaxContextBytes); err != nil {
			return fail(err)
		}
	}
	if err := s.checkDockerfile(ctx, project, ctxDir, spec); err != nil {
		return fail(err)
	}
	var packed []byte
	if s.Hosts != nil {
		// Any host may run or retry the build: its context goes to the shared store.
		var err error
		if packed, err = packDir(ctxDir); err != nil {
			return fail(err)
		}
	}
	now := time.Now()
	raw, _ := json.Marshal(spec)
	rec := store.Build{ID: id, Project: project, Branch: spec.Branch, State: Queued, Spec: raw, Result: json.RawMessage("{}"),
		NotBefore: now, CreatedAt: now, UpdatedAt: now}
	if packed != nil {
		if err := s.Store.PutBuildContext(ctx, id, packed); err != nil {
			return fail(err)
		}
	}
	if err := s.Store.CreateBuild(ctx, rec); err != nil {
		s.Store.DeleteBuildContext(context.WithoutCancel(ctx), id)
		return fail(err)
	}
	if len(secrets) > 0 {
		s.mu.Lock()
		if s.secrets == nil {
			s.secrets = map[string]map[string][]byte{}
		}
		s.secrets[id] = secrets
		s.mu.Unlock()
	}
	s.logfFor(ctx, "build %s of %s queued", id, project)
	if spec.Branch != "" && !spec.NoSupersede {
		s.supersede(ctx, project, spec.Branch, id)
	}
	s.kick()
	return s.Get(ctx, id)
}

// checkDockerfile parses the Dockerfile and checks the target and the local base images.
func (s *Service) checkDockerfile(ctx context.Context, project, ctxDir string, spec api.BuildSpec) error {
	b, err := readDockerfile(ctxDir, spec.Dockerfile)
	if err != nil {
		return err
	}
	stages, err := parseStages(b, spec.BuildArgs)
	if err != nil {
		return errdefs.Wrap(errdefs.ErrInvalid, err, "%s", spec.Dockerfile)
	}
	if spec.Target != "" {
		found := false
		var names []string
		for _, st := range stages {
			if strings.EqualFold(st.Name, spec.Target) {
				found = true
			}
			if st.Name != "" {
				names = append(names, st.Name)
			}
		}
		if !found {
			return errdefs.Invalid("target stage %q is not in %s (stages: %s)", spec.Target, spec.Dockerfile, strings.Join(names, ", "))
		}
	}
	refs, err := s.localBases(project, stages)
	if err != nil {
		return err
	}
	for _, ref := range refs {
		if _, err := s.Images.Resolve(ctx, ref); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "base image %s is not in kiln's registry: load it with `kiln image load` first", ref)
		}
	}
	return nil
}

// readDockerfile reads the Dockerfile from inside the context only: the path and every
// directory on it must be real files and directories there, never symlinks, which could
// point at the host's files.
func readDockerfile(ctxDir, rel string) ([]byte, error) {
	cur := ctxDir
	parts := strings.Split(rel, "/")
	for i, part := range parts {
		cur = filepath.Join(cur, part)
		fi, err := os.Lstat(cur)
		if err != nil {
			return nil, errdefs.Invalid("no Dockerfile at %s in the build context: add one, or name it with --file", rel)
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			return nil, errdefs.Invalid("the Dockerfile path %s goes through a symlink (%s): name the real file with --file", rel, strings.Join(parts[:i+1], "/"))
		}
	}
	root, err := os.OpenRoot(ctxDir)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	b, err := root.ReadFile(rel)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "reading the Dockerfile %s", rel)
	}
	return b, nil
}

// parseStages parses a Dockerfile and expands each FROM as BuildKit's frontend does:
// with the ARGs declared before the first FROM, their defaults replaced by the build's
// --build-arg values, and the platform ARGs BuildKit predefines. So FROM ${BASE} names
// the image the builder will ask for, and that image is checked and provided.
func parseStages(dockerfile []byte, buildArgs map[string]string) ([]instructions.Stage, error) {
	res, err := parser.Parse(bytes.NewReader(dockerfile))
	if err != nil {
		return nil, err
	}
	stages, metaArgs, err := instructions.Parse(res.AST, nil)
	if err != nil {
		return nil, err
	}
	if len(stages) == 0 {
		return nil, fmt.Errorf("no FROM instruction")
	}
	lex := shell.NewLex(res.EscapeToken)
	env := platformArgs(buildArgs)
	for _, cmd := range metaArgs {
		for _, kv := range cmd.Args {
			if v, ok := buildArgs[kv.Key]; ok {
				env.set(kv.Key, v)
			} else if kv.Value != nil {
				v, _, err := lex.ProcessWord(*kv.Value, env)
				if err != nil {
					return nil, parser.WithLocation(err, cmd.Location())
				}
				env.set(kv.Key, v)
			}
		}
	}
	for i := range stages {
		name, _, err := lex.ProcessWord(stages[i].BaseName, env)
		if err != nil {
			return nil, parser.WithLocation(err, stages[i].Location)
		}
		if name == "" {
			return nil, errdefs.Invalid("FROM %s is empty once its ARGs are expanded: give the ARG a default or pass --build-arg", stages[i].BaseName)
		}
		stages[i].BaseName = name
		if stages[i].Platform != "" {
			if stages[i].Platform, _, err = lex.ProcessWord(stages[i].Platform, env); err != nil {
				return nil, parser.WithLocation(err, stages[i].Location)
			}
		}
	}
	return stages, nil
}

// argEnv is the ARGs in scope at a FROM, in the shell lexer's terms.
type argEnv struct {
	keys []string
	vals map[string]string
}

func (e *argEnv) set(k, v string) {
	if _, ok := e.vals[k]; !ok {
		e.keys = append(e.keys, k)
	}
	e.vals[k] = v
}

func (e *argEnv) Get(k string) (string, bool) { v, ok := e.vals[k]; return v, ok }
func (e *argEnv) Keys() []string              { return e.keys }

// platformArgs are the ARGs BuildKit defines before any FROM: builders build for the
// host's platform, linux on its architecture. A --build-arg overrides them, as in
// BuildKit.
func platformArgs(buildArgs map[string]string) *argEnv {
	env := &argEnv{vals: map[string]string{}}
	plat := "linux/" + runtime.GOARCH
	for _, kv := range [][2]string{{"BUILDPLATFORM", plat}, {"BUILDOS", "linux"}, {"BUILDARCH", runtime.GOARCH},
		{"TARGETPLATFORM", plat}, {"TARGETOS", "linux"}, {"TARGETARCH", runtime.GOARCH}} {
		v := kv[1]
		if o, ok := buildArgs[kv[0]]; ok {
			v = o
		}
		env.set(kv[0], v)
	}
	return env
}

// localBases lists FROM images served by kiln's registry (localhost/...), which reach
// the builder through the build's session, refusing those project may not use.
func (s *Service) localBases(project string, stages []instructions.Stage) ([]string, error) {
	mayPull := s.MayPull
	if mayPull == nil {
		mayPull = OwnOrShared
	}
	refs := fromImages(stages)
	for _, ref := range refs {
		if err := mayPull(project, ref); err != nil {
			return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "FROM %s", ref)
		}
	}
	return refs, nil
}

// fromImages lists the localhost/ images stages name in FROM and COPY --from.
func fromImages(stages []instructions.Stage) []string {
	named := map[string]bool{}
	var out []string
	for _, st := range stages {
		if st.Name != "" {
			named[strings.ToLower(st.Name)] = true
		}
	}
	seen := map[string]bool{}
	add := func(ref string) {
		if named[strings.ToLower(ref)] || !strings.HasPrefix(ref, "localhost/") || seen[ref] {
			return
		}
		seen[ref] = true
		out = append(out, ref)
	}
	for _, st := range stages {
		add(st.BaseName)
		// COPY --from=IMAGE reads an image too.
		for _, c := range st.Commands {
			if cp, ok := c.(*instructions.CopyCommand); ok && cp.From != "" {
				add(cp.From)
			}
		}
	}
	return out
}

// toAPI turns a record into the API's shape.
func toAPI(b store.Build) api.Build {
	out := api.Build{ID: b.ID, Project: b.Project, State: b.State, Attempt: b.Attempt, Host: b.Host, CreatedAt: b.CreatedAt, UpdatedAt: b.UpdatedAt}
	json.Unmarshal(b.Spec, &out.Spec)
	json.Unmarshal(b.Result, &out.BuildResult)
	return out
}

// Get returns a build, with its queue position while queued.
func (s *Service) Get(ctx context.Context, id string) (api.Build, error) {
	b, err := s.Store.GetBuild(ctx, id)
	if err != nil {
		return api.Build{}, err
	}
	out := toAPI(b)
	if b.State == Queued {
		if q, err := s.Store.BuildsInState(ctx, Queued); err == nil {
			for i, x := range q {
				if x.ID == id {
					out.QueuePosition = i + 1
				}
			}
		}
	}
	return out, nil
}

// List lists a project's builds, newest first.
func (s *Service) List(ctx context.Context, project string) ([]api.Build, error) {
	bs, err := s.Store.ListBuilds(ctx, project)
	if err != nil {
		return nil, err
	}
	out := make([]api.Build, 0, len(bs))
	for _, b := range bs {
		out = append(out, toAPI(b))
	}
	return out, nil
}

// transition is the one place a build's state changes: a compare-and-swap in the store
// on the state, attempt and host b was read at, with result changes applied to the
// record. Going to running starts a new attempt on this host, so that whatever the
// previous attempt (on a host cut off meanwhile, say) still reports is refused.
func (s *Service) transition(ctx context.Context, b store.Build, to string, edit func(*api.BuildResult)) (store.Build, error) {
	if err := CheckTransition(b.State, to); err != nil {
		return b, err
	}
	var res api.BuildResult
	json.Unmarshal(b.Result, &res)
	if edit != nil {
		edit(&res)
	}
	raw, _ := json.Marshal(res)
	nb := b
	nb.State, nb.Result = to, raw
	if to == Running {
		nb.Attempt, nb.Host = b.Attempt+1, s.Host
	}
	if err := s.Store.UpdateBuild(ctx, nb, b.Rev()); err != nil {
		return b, err
	}
	if Terminal(to) {
		// Done: its secrets and its context go; its log stays.
		s.dropSecrets(b.ID)
		os.RemoveAll(filepath.Join(s.BuildDir(b.ID), "context"))
		if s.Hosts != nil {
			s.Store.DeleteBuildContext(ctx, b.ID)
		}
	}
	return nb, nil
}

// updateResult changes what a finished build records (its image was pruned, say) without
// changing its state: a compare-and-swap on what it was read at, so a concurrent change
// wins.
func (s *Service) updateResult(ctx context.Context, b store.Build, edit func(*api.BuildResult)) error {
	var res api.BuildResult
	json.Unmarshal(b.Result, &res)
	edit(&res)
	b.Result, _ = json.Marshal(res)
	return s.Store.UpdateBuild(ctx, b, b.Rev())
}

// Cancel stops a queued or running build.
func (s *Service) Cancel(ctx context.Context, id string) error {
	err := s.cancel(ctx, id, "canceled by the user")
	if err == nil {
		s.logfFor(ctx, "build %s canceled by the user", id)
	}
	return err
}

func (s *Service) cancel(ctx context.Context, id, why string) error {
	b, err := s.Store.GetBuild(ctx, id)
	if err != nil {
		return err
	}
	switch b.State {
	case Queued:
		_, err := s.transition(ctx, b, Canceled, func(r *api.BuildResult) { r.Error = why })
		if errors.Is(err, errdefs.ErrConflict) {
			return s.cancel(ctx, id, why) // it started meanwhile
		}
		return err
	case Running:
		s.mu.Lock()
		stop := s.running[id]
		s.mu.Unlock()
		if stop == nil {
			if b.Host != "" && b.Host != s.Host {
				return errdefs.New(errdefs.ErrConflict, "build %s runs on host %s: cancel it there", id, b.Host)
			}
			// Its attempt just ended; the build is queued or done by now.
			time.Sleep(50 * time.Millisecond)
			return s.cancel(ctx, id, why)
		}
		s.writeLog(id, "kiln: "+why+"\n")
		s.setCancelReason(id, why)
		stop()
		return nil
	default:
		return errdefs.New(errdefs.ErrConflict, "build %s is already %s", id, b.State)
	}
}

func (s *Service) setCancelReason(id, why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.reasons == nil {
		s.reasons = map[string]string{}
	}
	s.reasons[id] = why
}

// supersede cancels the project's other builds of branch.
func (s *Service) supersede(ctx context.Context, project, branch, newID string) {
	bs, err := s.Store.ListBuilds(ctx, project)
	if err != nil {
		return
	}
	for _, b := range bs {
		if b.ID != newID && b.Branch == branch && (b.State == Queued || b.State == Running) {
			s.logfFor(ctx, "build %s of %s (branch %s) is superseded by %s", b.ID, project, branch, newID)
			s.cancel(ctx, b.ID, "superseded by build "+newID)
		}
	}
}

func (s *Service) kick() {
	s.mu.Lock()
	if s.wake == nil {
		s.wake = make(chan struct{}, 1)
	}
	w := s.wake
	s.mu.Unlock()
	select {
	case w <- struct{}{}:
	default:
	}
}

func (s *Service) writeLog(id, line string) {
	os.MkdirAll(s.BuildDir(id), 0o755) // a build taken over from another host has no directory here yet
	f, err := os.OpenFile(s.LogPath(id), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err == nil {
		f.WriteString(line)
		f.Close()
	}
}
