package deploy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/appconfig"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

// Machines is what a deploy needs of the machines service.
type Machines interface {
	// List is the app's machines, each config with its metadata.
	List(ctx context.Context, app string) ([]store.Machine, []api.MachineConfig, error)
	Get(ctx context.Context, id string) (store.Machine, error)
	Create(ctx context.Context, app string, req api.CreateMachineRequest) (store.Machine, error)
	Update(ctx context.Context, id string, req api.CreateMachineRequest) (store.Machine, error)
	Start(ctx context.Context, id string) error
	Destroy(ctx context.Context, id string) error
	SetCordoned(ctx context.Context, id string, on bool) error
	// Volume finds an unattached volume of source's family for a new machine, or
	// creates one of sizeGB; it returns its name.
	Volume(ctx context.Context, app, source string, sizeGB int) (string, error)
}

// Health is the proxy's view of a machine's checks and traffic.
type Health interface {
	Health(id string) HealthState
}

// HealthState is one machine's health as the proxy last saw it.
type HealthState struct {
	StartedAt time.Time
	Rounds    int
	Passing   bool
	Inflight  int
	Cordoned  bool
	Known     bool // the proxy routes to it (it has services)
}

// Store keeps releases and tells the secrets' latest version.
type Store interface {
	store.Releases
	SecretsAt(ctx context.Context, app string, version int) (store.SecretsVersion, error)
}

// Engine runs deploys: one at a time per app, on the server, recorded as releases.
type Engine struct {
	Store    Store
	Machines Machines
	Health   Health
	Log      *slog.Logger
	// Base is the context deploys run in: detached from the calls that start them,
	// ended when the server stops (a running deploy then resumes at the next start).
	Base context.Context
	// Poll is how often waits look again; Drain bounds the wait for a cordoned
	// machine's requests to finish.
	Poll, Drain time.Duration

	mu      sync.Mutex
	running map[string]int // app → the release deploying
	wg      sync.WaitGroup
}

// Progress is a release's durable record of its deploy.
type Progress struct {
	// Phase is release_command, converge or rollback.
	Phase string `json:"phase"`
	// Plan is the plan as first made, for the record.
	Plan *Plan `json:"plan,omitempty"`
	// Resumed says how many times a restarted server took the deploy up again.
	Resumed int `json:"resumed,omitempty"`
}

func (e *Engine) poll() time.Duration {
	if e.Poll > 0 {
		return e.Poll
	}
	return 200 * time.Millisecond
}

func (e *Engine) logf(app string, version int, format string, args ...any) {
	if e.Log != nil {
		e.Log.Info(fmt.Sprintf(format, args...), "app", app, "release", version)
	}
}

// existing reads the app's machines as plans see them.
func (e *Engine) existing(ctx context.Context, app string) ([]Existing, error) {
	recs, cfgs, err := e.Machines.List(ctx, app)
	if err != nil {
		return nil, err
	}
	out := make([]Existing, len(recs))
	for i, r := range recs {
		md := cfgs[i].Metadata
		rel, _ := strconv.Atoi(md[MetaRelease])
		sec, _ := strconv.Atoi(md[MetaSecrets])
		out[i] = Existing{ID: r.ID, Group: md[MetaGroup], Release: rel, Secrets: sec, State: r.State, Cordoned: r.Cordoned, Config: cfgs[i]}
	}
	return out, nil
}

// Plan is what deploying spec would change now, changing nothing.
func (e *Engine) Plan(ctx context.Context, app string, spec Spec) (Plan, error) {
	sec, err := e.Store.SecretsAt(ctx, app, 0)
	if err != nil {
		return Plan{}, err
	}
	return e.plan(ctx, app, spec, 0, sec.Version, spec.Config.Strategy())
}

func (e *Engine) plan(ctx context.Context, app string, spec Spec, release, secrets int, strategy string) (Plan, error) {
	desired, err := Desired(spec, release, secrets)
	if err != nil {
		return Plan{}, errdefs.Wrap(errdefs.ErrInvalid, err, "config")
	}
	ex, err := e.existing(ctx, app)
	if err != nil {
		return Plan{}, err
	}
	return MakePlan(strategy, desired, spec.Counts, secrets, ex), nil
}

// Deploy records spec as the app's next release and starts deploying it; it returns
// at once with the release and its plan. One deploy runs per app: another is
// ErrConflict. rollbackOf names the release a rollback deploys again.
func (e *Engine) Deploy(ctx context.Context, app string, spec Spec, token string, rollbackOf int) (store.Release, Plan, error) {
	sec, err := e.Store.SecretsAt(ctx, app, 0)
	if err != nil {
		return store.Release{}, Plan{}, err
	}
	// Checked before anything is recorded: a config that cannot make machines is the
	// caller's mistake, not a failed release.
	p, err := e.plan(ctx, app, spec, 0, sec.Version, spec.Config.Strategy())
	if err != nil {
		return store.Release{}, Plan{}, err
	}
	e.mu.Lock()
	if e.running == nil {
		e.running = map[string]int{}
	}
	if v, busy := e.running[app]; busy {
		e.mu.Unlock()
		return store.Release{}, Plan{}, errdefs.New(errdefs.ErrConflict, "release %d of %s is still deploying: wait for it (kiln releases) before deploying again", v, app)
	}
	e.running[app] = 0
	e.mu.Unlock()
	// Another host sharing the database may be deploying the app: its release is
	// recorded running. One nothing has touched for longer than any deploy waits is
	// abandoned (its host died) and is ended here.
	if last, err := e.Store.ListReleases(ctx, app, 1); err != nil {
		e.done(app)
		return store.Release{}, Plan{}, err
	} else if len(last) == 1 && (last[0].State == store.ReleasePending || last[0].State == store.ReleaseRunning) {
		if time.Since(last[0].UpdatedAt) < abandoned {
			e.done(app)
			return store.Release{}, Plan{}, errdefs.New(errdefs.ErrConflict, "release %d of %s is still deploying (on another host): wait for it (kiln releases) before deploying again", last[0].Version, app)
		}
		e.finish(ctx, last[0], store.ReleaseFailed, fmt.Sprintf("abandoned: nothing changed it for %s (its host stopped)", time.Since(last[0].UpdatedAt).Round(time.Minute)))
	}
	raw, _ := json.Marshal(spec)
	prog, _ := json.Marshal(Progress{Plan: &p})
	rel, err := e.Store.CreateRelease(ctx, store.Release{App: app, State: store.ReleasePending, Strategy: spec.Config.Strategy(),
		Image: spec.Image, Config: raw, SecretsVersion: sec.Version, Token: token, RollbackOf: rollbackOf, Progress: prog})
	if err != nil {
		e.done(app)
		return rel, p, err
	}
	e.mu.Lock()
	e.running[app] = rel.Version
	e.mu.Unlock()
	// Each release keeps its config: an app keeps its last KeepReleases, enough to
	// roll back far, and no more however often it deploys.
	if _, err := e.Store.PruneReleases(ctx, app, KeepReleases); err != nil {
		e.logf(app, rel.Version, "pruning old releases: %v", err)
	}
	e.start(rel)
	return rel, p, nil
}

func (e *Engine) done(app string) {
	e.mu.Lock()
	delete(e.running, app)
	e.mu.Unlock()
}

// start runs a release's deploy in the background, detached from the call that asked
// for it: a CLI that disconnects does not stop it.
func (e *Engine) start(rel store.Release) {
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		defer e.done(rel.App)
		ctx := e.Base
		if ctx == nil {
			ctx = context.Background()
		}
		e.run(ctx, rel)
	}()
}

// Resume takes up the deploys a stopped server left: one that was converging resumes
// (its plan is made again from the machines as they are), one rolling back goes on
// rolling back, and one whose release command was running waits for that machine's
// exit, without running the command again. Each says which in its message.
func (e *Engine) Resume(ctx context.Context) error {
	rels, err := e.Store.ReleasesInState(ctx, store.ReleasePending, store.ReleaseRunning)
	if err != nil {
		return err
	}
	for _, rel := range rels {
		var prog Progress
		json.Unmarshal(rel.Progress, &prog)
		e.mu.Lock()
		if e.running == nil {
			e.running = map[string]int{}
		}
		e.running[rel.App] = rel.Version
		e.mu.Unlock()
		switch prog.Phase {
		case "":
			rel.Message = "the server restarted before the deploy began; starting it now"
		case "release_command":
			rel.Message = "the server restarted while the release command ran; waiting for it (it is not run again)"
		case "converge":
			rel.Message = "the server restarted mid-deploy; resuming it from the machines as they are"
		case "rollback":
			rel.Message = "the server restarted mid-rollback; resuming the rollback"
		}
		prog.Resumed++
		rel.Progress, _ = json.Marshal(prog)
		if err := e.Store.UpdateRelease(ctx, rel, rel.State); err != nil {
			e.done(rel.App)
			return err
		}
		e.logf(rel.App, rel.Version, "%s", rel.Message)
		e.start(rel)
	}
	return nil
}

// Wait returns once no deploy runs (for tests and shutdown).
func (e *Engine) Wait() { e.wg.Wait() }

// setPhase records the deploy's phase and a message, keeping the state at running.
func (e *Engine) setPhase(ctx context.Context, rel *store.Release, phase, msg string) error {
	var prog Progress
	json.Unmarshal(rel.Progress, &prog)
	prog.Phase = phase
	from := rel.State
	next := *rel
	next.State = store.ReleaseRunning
	next.Progress, _ = json.Marshal(prog)
	if msg != "" {
		next.Message = msg
	}
	if err := e.Store.UpdateRelease(ctx, next, from); err != nil {
		return err
	}
	*rel = next
	return nil
}

// abort ends a release whose own record could not be written (the database failed),
// unless the server is stopping (then it resumes at start): left running, it would
// hold every later deploy of the app back.
func (e *Engine) abort(ctx context.Context, rel store.Release, err error) {
	if ctx.Err() != nil {
		return
	}
	e.logf(rel.App, rel.Version, "recording the deploy's progress: %v", err)
	for i := 0; i < 3; i++ {
		cur, gerr := e.Store.GetRelease(context.WithoutCancel(ctx), rel.App, rel.Version)
		if gerr == nil {
			e.finish(ctx, cur, store.ReleaseFailed, "the deploy could not record its progress: "+err.Error())
			return
		}
		time.Sleep(time.Second)
	}
}

func (e *Engine) finish(ctx context.Context, rel store.Release, state, msg string) {
	var prog Progress
	if json.Unmarshal(rel.Progress, &prog) == nil && prog.Resumed > 0 {
		msg = fmt.Sprintf("resumed after %d server restart(s); %s", prog.Resumed, msg)
	}
	from := rel.State
	rel.State, rel.Message = state, msg
	if err := e.Store.UpdateRelease(context.WithoutCancel(ctx), rel, from); err != nil {
		e.logf(rel.App, rel.Version, "recording the release's end (%s: %s): %v", state, msg, err)
		return
	}
	e.logf(rel.App, rel.Version, "release %d %s: %s", rel.Version, state, msg)
}

func (e *Engine) run(ctx context.Context, rel store.Release) {
	var spec Spec
	if err := json.Unmarshal(rel.Config, &spec); err != nil {
		e.finish(ctx, rel, store.ReleaseFailed, "its stored spec does not read: "+err.Error())
		return
	}
	var prog Progress
	json.Unmarshal(rel.Progress, &prog)
	if prog.Phase == "rollback" {
		e.rollback(ctx, rel, "resumed after a restart")
		return
	}
	if prog.Phase == "" || prog.Phase == "release_command" {
		if cmd := spec.Config.Deploy.ReleaseCommand; cmd != "" {
			if err := e.setPhase(ctx, &rel, "release_command", "running the release command"); err != nil {
				e.abort(ctx, rel, err)
				return
			}
			if err := e.releaseCommand(ctx, rel, spec, cmd); err != nil {
				if ctx.Err() == nil { // else the server is stopping: resumed at start
					e.finish(ctx, rel, store.ReleaseFailed, err.Error())
				}
				return
			}
		}
	}
	if err := e.setPhase(ctx, &rel, "converge", ""); err != nil {
		e.abort(ctx, rel, err)
		return
	}
	err := e.converge(ctx, &rel, spec, rel.Version, rel.SecretsVersion, spec.Config.Strategy())
	var cf *checkFailed
	switch {
	case err == nil:
		e.finish(ctx, rel, store.ReleaseSucceeded, fmt.Sprintf("every machine runs release %d", rel.Version))
	case errors.As(err, &cf):
		e.rollback(ctx, rel, err.Error())
	case ctx.Err() != nil:
		// The server is stopping: the release stays running and resumes at start.
	default:
		e.rollback(ctx, rel, err.Error())
	}
}

// rollback deploys the latest release that succeeded before rel again, rolling.
func (e *Engine) rollback(ctx context.Context, rel store.Release, why string) {
	if ctx.Err() != nil {
		return // the server is stopping: the release resumes at start
	}
	prev, err := e.previous(ctx, rel)
	switch {
	case errors.Is(err, errdefs.ErrNotFound):
		e.finish(ctx, rel, store.ReleaseFailed, fmt.Sprintf("%s; and no earlier release succeeded, so there is none to roll back to", why))
		return
	case err != nil:
		e.finish(ctx, rel, store.ReleaseFailed, fmt.Sprintf("%s; finding the release to roll back to: %v", why, err))
		return
	}
	if err := e.setPhase(ctx, &rel, "rollback", fmt.Sprintf("%s; rolling back to release %d", why, prev.Version)); err != nil {
		e.abort(ctx, rel, err)
		return
	}
	var spec Spec
	json.Unmarshal(prev.Config, &spec)
	// Secrets are not rolled back: one unset since (a revoked credential) stays unset.
	sec, err := e.Store.SecretsAt(ctx, rel.App, 0)
	if err != nil {
		e.finish(ctx, rel, store.ReleaseFailed, fmt.Sprintf("%s; reading the secrets for the rollback: %v", why, err))
		return
	}
	if err := e.converge(ctx, &rel, spec, prev.Version, sec.Version, "rolling"); err != nil {
		if ctx.Err() == nil {
			e.finish(ctx, rel, store.ReleaseFailed, fmt.Sprintf("%s; the rollback to release %d failed too: %v", why, prev.Version, err))
		}
		return
	}
	e.finish(ctx, rel, store.ReleaseRolledBack, fmt.Sprintf("%s; release %d serves again", why, prev.Version))
}

func (e *Engine) previous(ctx context.Context, rel store.Release) (store.Release, error) {
	rels, err := e.Store.ListReleases(ctx, rel.App, 0)
	if err != nil {
		return store.Release{}, err
	}
	for _, r := range rels {
		if r.Version < rel.Version && r.State == store.ReleaseSucceeded {
			return r, nil
		}
	}
	return store.Release{}, errdefs.New(errdefs.ErrNotFound, "no release before %d succeeded", rel.Version)
}

// KeepReleases is how many of an app's releases are kept.
const KeepReleases = 100

// abandoned is how long a running release may go unchanged before a deploy of its app
// on another host takes it for dead: longer than any wait of a deploy.
const abandoned = appconfig.MaxTimeout + 2*DefaultDrain

// DefaultDrain bounds the wait for a machine's requests once it is out of service.
const DefaultDrain = 30 * time.Second
