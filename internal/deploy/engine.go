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
	"github.com/kilnhq/kiln/internal/machine"
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

// checkFailed is a machine that did not become healthy in time: the deploy rolls back.
type checkFailed struct {
	id    string
	after time.Duration
	why   string
}

func (c *checkFailed) Error() string {
	return fmt.Sprintf("machine %s was not healthy after %s: %s", c.id, c.after, c.why)
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

// converge applies the plan from spec to the machines as they are now, by strategy.
func (e *Engine) converge(ctx context.Context, rel *store.Release, spec Spec, version, secrets int, strategy string) error {
	p, err := e.plan(ctx, rel.App, spec, version, secrets, strategy)
	if err != nil {
		return err
	}
	wait := spec.Config.WaitTimeout()
	sizes := volumeSizes(spec.Config)
	for i := range p.Steps {
		p.Steps[i].VolumeGB = sizes
	}
	var changing, creates, destroys, cordoned []Step
	for _, s := range p.Steps {
		switch {
		case s.Change == Update || s.Change == Replace:
			changing = append(changing, s)
		case s.Change == Create:
			creates = append(creates, s)
		case s.Change == Destroy:
			destroys = append(destroys, s)
		case s.Cordoned:
			cordoned = append(cordoned, s)
		}
	}
	// A kept machine a cut-short deploy left out of service comes back once healthy.
	for _, s := range cordoned {
		if err := e.readmit(ctx, rel, s, wait); err != nil {
			return err
		}
	}
	var chunks [][]Step
	switch strategy {
	case "immediate", "bluegreen":
		chunks = [][]Step{changing}
	case "canary":
		if len(changing) > 0 {
			chunks = append(chunks, changing[:1])
			changing = changing[1:]
		}
		fallthrough
	default: // rolling: max_unavailable of each group's machines at a time
		kept := map[string]int{}
		for _, st := range p.Steps {
			if st.Machine != "" && st.Change != Destroy {
				kept[st.Group]++
			}
		}
		byGroup := map[string][]Step{}
		var groups []string
		for _, st := range changing {
			if byGroup[st.Group] == nil {
				groups = append(groups, st.Group)
			}
			byGroup[st.Group] = append(byGroup[st.Group], st)
		}
		for _, g := range groups {
			steps, n := byGroup[g], spec.Config.MaxUnavailable(kept[g])
			for len(steps) > 0 {
				k := min(max(n, 1), len(steps))
				chunks = append(chunks, steps[:k])
				steps = steps[k:]
			}
		}
	}
	done, total := 0, len(p.Steps)-len(cordoned)
	for _, st := range p.Steps {
		if st.Change == None && !st.Cordoned {
			total--
		}
	}
	progress := func(what string) {
		rel.Message = fmt.Sprintf("%s (%d of %d machines done)", what, done, total)
		e.Store.UpdateRelease(ctx, *rel, rel.State)
	}
	for _, s := range creates {
		progress("creating a machine of group " + s.Group)
		if _, err := e.create(ctx, rel.App, s, wait); err != nil {
			return err
		}
		done++
	}
	for _, chunk := range chunks {
		if len(chunk) == 0 {
			continue
		}
		progress(fmt.Sprintf("changing %d machine(s) by %s", len(chunk), strategy))
		if err := e.change(ctx, rel.App, chunk, wait, strategy); err != nil {
			return err
		}
		done += len(chunk)
	}
	for _, s := range destroys {
		progress("destroying machine " + s.Machine)
		if err := e.retire(ctx, s.Machine); err != nil {
			return err
		}
		done++
	}
	return nil
}

// change applies a chunk of updates and replaces: the machines leave service together,
// and each comes back once healthy. Replaces get their new machine first, and lose the
// old one only once the new one is healthy.
func (e *Engine) change(ctx context.Context, app string, chunk []Step, wait time.Duration, strategy string) error {
	var updates, replaces []Step
	for _, s := range chunk {
		if s.Change == Update {
			updates = append(updates, s)
		} else {
			replaces = append(replaces, s)
		}
	}
	// Replaces: every new machine is made and healthy before any old one goes (for
	// bluegreen, that is the whole app at once).
	var fresh []string
	for _, s := range replaces {
		id, err := e.create(ctx, app, s, 0)
		if err != nil {
			return err
		}
		fresh = append(fresh, id)
	}
	for i, id := range fresh {
		if err := e.healthy(ctx, id, replaces[i].Config, time.Time{}, wait); err != nil {
			return err
		}
	}
	for _, id := range fresh {
		if err := e.Machines.SetCordoned(ctx, id, false); err != nil {
			return err
		}
	}
	for _, s := range replaces {
		if err := e.retire(ctx, s.Machine); err != nil {
			return err
		}
	}
	if len(updates) == 0 {
		return nil
	}
	for _, s := range updates {
		if err := e.Machines.SetCordoned(ctx, s.Machine, true); err != nil {
			return err
		}
	}
	for _, s := range updates {
		e.drained(ctx, s.Machine)
	}
	since := time.Now()
	for _, s := range updates {
		if _, err := e.Machines.Update(ctx, s.Machine, api.CreateMachineRequest{Config: s.Config}); err != nil {
			return err
		}
	}
	for _, s := range updates {
		if strategy == "immediate" {
			continue
		}
		if err := e.healthy(ctx, s.Machine, s.Config, since, wait); err != nil {
			return err
		}
	}
	for _, s := range updates {
		if err := e.Machines.SetCordoned(ctx, s.Machine, false); err != nil {
			return err
		}
	}
	return nil
}

// create makes a machine for a step, out of service; with wait > 0 it waits for it to
// be healthy and lets it in.
func (e *Engine) create(ctx context.Context, app string, s Step, wait time.Duration) (string, error) {
	cfg := s.Config
	cfg.Mounts = append([]api.Mount(nil), cfg.Mounts...)
	for i, mt := range cfg.Mounts {
		size := s.VolumeGB[mt.Path]
		if size < 1 {
			size = 1
		}
		name, err := e.Machines.Volume(ctx, app, volumeFamily(mt.Volume), size)
		if err != nil {
			return "", err
		}
		cfg.Mounts[i].Volume = name
	}
	m, err := e.Machines.Create(ctx, app, api.CreateMachineRequest{Config: cfg, SkipServiceRegistration: true})
	if err != nil {
		return "", err
	}
	if wait == 0 {
		return m.ID, nil
	}
	if err := e.healthy(ctx, m.ID, cfg, time.Time{}, wait); err != nil {
		return m.ID, err
	}
	return m.ID, e.Machines.SetCordoned(ctx, m.ID, false)
}

// volumeSizes is the initial size, in GB, of each mount's volumes by destination (1 when
// the config gives none).
func volumeSizes(cfg appconfig.Config) map[string]int {
	out := map[string]int{}
	for _, m := range cfg.Mounts {
		gb, err := m.InitialSize.GB()
		if err != nil || gb < 1 {
			gb = 1
		}
		out[m.Destination] = gb
	}
	return out
}

// readmit brings a kept machine that is out of service back once it is healthy.
func (e *Engine) readmit(ctx context.Context, rel *store.Release, s Step, wait time.Duration) error {
	m, err := e.Machines.Get(ctx, s.Machine)
	if err != nil {
		return err
	}
	if m.State != machine.Started && m.State != machine.Starting {
		if err := e.Machines.Start(ctx, s.Machine); err != nil && !errors.Is(err, errdefs.ErrConflict) {
			return err
		}
	}
	if err := e.healthy(ctx, s.Machine, s.Config, time.Time{}, wait); err != nil {
		return err
	}
	return e.Machines.SetCordoned(ctx, s.Machine, false)
}

// retire takes a machine out of service, lets its requests finish, and destroys it.
func (e *Engine) retire(ctx context.Context, id string) error {
	if err := e.Machines.SetCordoned(ctx, id, true); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		return err
	}
	e.drained(ctx, id)
	if err := e.Machines.Destroy(ctx, id); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		return err
	}
	return nil
}

// KeepReleases is how many of an app's releases are kept.
const KeepReleases = 100

// abandoned is how long a running release may go unchanged before a deploy of its app
// on another host takes it for dead: longer than any wait of a deploy.
const abandoned = appconfig.MaxTimeout + 2*DefaultDrain

// DefaultDrain bounds the wait for a machine's requests once it is out of service.
const DefaultDrain = 30 * time.Second

// drained waits, up to Drain, until the proxy has the machine out of service with no
// request in flight.
func (e *Engine) drained(ctx context.Context, id string) {
	limit := e.Drain
	if limit <= 0 {
		limit = DefaultDrain
	}
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		h := e.health(id)
		if !h.Known || (h.Cordoned && h.Inflight == 0) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(e.poll() / 4):
		}
	}
}

func (e *Engine) health(id string) HealthState {
	if e.Health == nil {
		return HealthState{}
	}
	return e.Health.Health(id)
}

// downFor is how long a machine may stay stopped or failed while a deploy waits for it:
// a restart policy brings a crashed workload back within it.
const downFor = 5 * time.Second

// healthy waits until a machine runs a start later than since and, if its services
// have checks, the proxy has seen them pass on that run.
func (e *Engine) healthy(ctx context.Context, id string, cfg api.MachineConfig, since time.Time, wait time.Duration) error {
	// Checks are run by the proxy: a server without one (--proxy-listen off) waits
	// for the machine to start.
	checks := false
	for _, s := range cfg.Services {
		checks = checks || len(s.Checks) > 0 && e.Health != nil
	}
	start := time.Now()
	why := "it did not start"
	var downSince time.Time
	for {
		m, err := e.Machines.Get(ctx, id)
		if err != nil {
			return err
		}
		switch {
		case m.State == machine.Started && !checks:
			return nil
		case m.State == machine.Started:
			h := e.health(id)
			switch {
			case h.StartedAt.IsZero() || h.StartedAt.Before(since):
				why = "its checks have not run yet"
			case h.Rounds == 0:
				why = "its checks have not run yet"
			case h.Passing:
				return nil
			default:
				why = "its health checks fail"
			}
		case m.State == machine.Stopped && m.ExitCode != nil:
			why = fmt.Sprintf("its workload exited with code %d (kiln logs %s)", *m.ExitCode, id)
		case m.State == machine.Failed:
			why = "it failed to start"
		}
		// A machine that stays down is not coming back (its restart policy gave up):
		// no point waiting out the timeout.
		if down := m.State == machine.Stopped || m.State == machine.Failed || m.State == machine.Destroyed; !down {
			downSince = time.Time{}
		} else if downSince.IsZero() {
			downSince = time.Now()
		} else if time.Since(downSince) >= downFor {
			return &checkFailed{id: id, after: time.Since(start).Round(time.Second), why: why}
		}
		if time.Since(start) >= wait {
			return &checkFailed{id: id, after: wait, why: why}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(e.poll()):
		}
	}
}

// releaseCommand runs the release command in a temporary machine, as Fly makes it
// (appconfig.ReleaseMachineConfig), and destroys it once it exits; a non-zero exit stops
// the deploy before anything changes. A machine an earlier run of this deploy started
// (the server restarted meanwhile) is waited on, not started again: a migration must
// not run twice at once. A server that stops leaves it running.
func (e *Engine) releaseCommand(ctx context.Context, rel store.Release, spec Spec, cmd string) error {
	name := fmt.Sprintf("release-command-%d", rel.Version)
	id, err := e.releaseMachine(ctx, rel.App, name)
	if err != nil {
		return err
	}
	if id == "" {
		cfg, err := spec.Config.ReleaseMachineConfig(spec.Image)
		if err != nil {
			return err
		}
		cfg.Metadata[MetaSecrets] = strconv.Itoa(rel.SecretsVersion)
		m, err := e.Machines.Create(ctx, rel.App, api.CreateMachineRequest{Name: name, Config: cfg, SkipServiceRegistration: true})
		if err != nil {
			return fmt.Errorf("release_command: starting its machine: %w", err)
		}
		id = m.ID
	}
	limit := spec.Config.ReleaseCommandTimeout()
	start := time.Now()
	var m store.Machine
	for {
		if m, err = e.Machines.Get(ctx, id); err != nil {
			return err
		}
		if m.State == machine.Stopped || m.State == machine.Failed || m.State == machine.Destroyed {
			break
		}
		if time.Since(start) > limit {
			e.Machines.Destroy(context.WithoutCancel(ctx), id)
			return fmt.Errorf("release_command %q ran past release_command_timeout (%s) and was stopped; no machine of the app was changed", cmd, limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(e.poll()):
		}
	}
	e.Machines.Destroy(context.WithoutCancel(ctx), id)
	if m.ExitCode == nil || *m.ExitCode != 0 {
		code := "no exit code"
		if m.ExitCode != nil {
			code = "exit code " + strconv.Itoa(*m.ExitCode)
		}
		return fmt.Errorf("release_command %q failed (%s, machine %s: kiln logs %s); no machine of the app was changed", cmd, code, id, id)
	}
	return nil
}

// releaseMachine finds the release command's machine by its name; "" when none.
func (e *Engine) releaseMachine(ctx context.Context, app, name string) (string, error) {
	recs, _, err := e.Machines.List(ctx, app)
	if err != nil {
		return "", err
	}
	for _, r := range recs {
		if r.Name == name {
			return r.ID, nil
		}
	}
	return "", nil
}
