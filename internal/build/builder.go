package build

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// BuildersApp is the internal app (machine.InternalApp) whose machines are builders:
// one per project, run by the machines' supervisor like any machine (capacity, suspend
// and resume, adoption after a kiln restart).
const BuildersApp = "_builders"

// builderID is the machine ID (and name) of a project's builder on this host: hosts
// sharing a database each have their own, with their own copy of the cache.
func (b *Builders) builderID(project string) string {
	if b.Host == "" {
		return "builder-" + project
	}
	return "builder-" + b.Host + "-" + project
}

// projectEnv is where a builder machine's config names its project.
const projectEnv = "KILN_BUILDER_PROJECT"

// projectOf is the project whose cache a builder machine mounts.
func projectOf(rec store.Machine) string { return machine.DecodeConfig(rec.Config).Env[projectEnv] }

// Machines is what builders need of the machine service.
type Machines interface {
	EnsureInternal(ctx context.Context, app, id, name string, cfg api.MachineConfig) (store.Machine, error)
	// Internal lists this host's machines of an internal app.
	Internal(ctx context.Context, app string) ([]store.Machine, error)
	Get(ctx context.Context, id string) (store.Machine, error)
	Start(ctx context.Context, id string) error
	Stop(ctx context.Context, id string) error
	Suspend(ctx context.Context, id string) error
	Destroy(ctx context.Context, id string, force bool) error
	Wait(ctx context.Context, id string, state machine.State, timeout time.Duration) error
	Instance(id string) *vmrun.Instance
	Changed() <-chan struct{}
	CanSuspend() bool
	Events(ctx context.Context, id string) ([]machine.Event, error)
}

// Builders keeps one builder machine per project. Each project's BuildKit state lives on
// a volume of its own (DIR/PROJECT/cache.ext4) that only that project's VM ever mounts:
// the cache stays on this host, and projects never see each other's files. Builders is
// also the machines' internal kind for BuildersApp: it makes a builder's VM.
type Builders struct {
	RT *vmrun.Runtime
	// Rootfs is the builder root filesystem (buildkitd, runc).
	Rootfs string
	Dir    string
	// CacheBytes sizes a new cache volume; KeepBytes is BuildKit's GC target on it.
	CacheBytes int64
	KeepBytes  int64
	CPUs       int
	MemoryMiB  int
	// Idle is how long a builder waits for the next build before it is suspended (or
	// stopped where the VMM cannot suspend).
	Idle time.Duration
	// Net, when set, gives each project's builder a network of its own, under the
	// machines' egress policy: RUN steps reach the internet, not the host's neighbours.
	Net Network
	Log io.Writer
	// Host names this host where hosts share the database ("" otherwise): builders are
	// per host, like their caches.
	Host string
	// Machines runs the builders. It is made with Builders as its BuildersApp kind, so
	// it is set once both exist (Use).
	Machines Machines

	mu     sync.Mutex
	m      map[string]*Builder
	resets map[string]int
	// reset marks a project whose cache the last boot reset, until its build reads it.
	reset  map[string]bool
	plocks map[string]*sync.Mutex
}

// Use sets the machine service that runs the builders.
func (b *Builders) Use(ms Machines) { b.Machines = ms }

// Network is the part of the machines' network that builders use. A project's lease is
// kept from its builder's first boot until the builder machine is destroyed.
type Network interface {
	Attach(ctx context.Context, app, id string) (network.Lease, error)
	Detach(ctx context.Context, id string) error
}

// netApp names a project's builder network; app names cannot start with an underscore,
// so no app shares it.
func netApp(project string) string { return "_build-" + project }

// Builder is a project's running builder VM with buildkitd.
type Builder struct {
	Project string
	Inst    *vmrun.Instance
	// Ready is how long the builder took to become ready for this use: zero when it was
	// already running (warm).
	Ready time.Duration
	// Resumed says this use woke the builder from a suspend rather than booting it.
	Resumed bool
	// CacheReset is set when booting found the cache left by a builder that did not stop
	// cleanly, and emptied it.
	CacheReset bool
	mu         sync.Mutex
	busy       int
	lastUsed   time.Time
}

func (b *Builders) logf(format string, args ...any) {
	if b.Log != nil {
		fmt.Fprintf(b.Log, "kiln: builds: "+format+"\n", args...)
	}
}

// CachePath is the project's cache volume.
func (b *Builders) CachePath(project string) string {
	return filepath.Join(b.Dir, project, "cache.ext4")
}

// config is a builder machine's config: its size; it never restarts by itself (the
// next build starts it).
func (b *Builders) config(project string) api.MachineConfig {
	return api.MachineConfig{Guest: api.Guest{CPUs: b.CPUs, MemoryMB: b.MemoryMiB}, Restart: api.Restart{Policy: "no"},
		Env: map[string]string{projectEnv: project}}
}

// alive says whether a builder VM still runs.
func alive(inst *vmrun.Instance) bool {
	select {
	case <-inst.VM.Wait():
		return false
	default:
		return true
	}
}

// Acquire returns the project's builder, starting its machine (and creating its cache
// volume) if it is not running: a suspended one is resumed, a stopped one booted on the
// same cache, one that a restarted kiln adopted is used as it is. Release it when the
// build is done.
func (b *Builders) Acquire(ctx context.Context, project string) (*Builder, error) {
	// One project's builder changes one step at a time: two VMs must never mount its
	// cache volume, and a suspend must finish before a resume.
	pl := b.projectLock(project)
	pl.Lock()
	defer pl.Unlock()
	id := b.builderID(project)
	if _, err := b.Machines.EnsureInternal(ctx, BuildersApp, id, id, b.config(project)); err != nil {
		return nil, fmt.Errorf("recording the builder of %s: %w", project, err)
	}
	var start time.Time
	resumed := false
	for {
		changed := b.Machines.Changed()
		rec, err := b.Machines.Get(ctx, id)
		if err != nil {
			return nil, err
		}
		switch rec.State {
		case machine.Started:
			if inst := b.Machines.Instance(id); inst != nil && alive(inst) {
				return b.use(project, inst, start, resumed), nil
			}
			// Its VM died: the supervisor records the exit, then it is booted again
			// on the same cache.
		case machine.Failed:
			if !start.IsZero() {
				return nil, b.whyFailed(ctx, project, id)
			}
			fallthrough
		case machine.Created, machine.Stopped, machine.Suspended:
			if start.IsZero() {
				start = time.Now()
			}
			resumed = rec.State == machine.Suspended
			if err := b.Machines.Start(ctx, id); err != nil && !errors.Is(err, errdefs.ErrConflict) {
				return nil, fmt.Errorf("starting the builder of %s: %w", project, err)
			}
		case machine.Starting, machine.Stopping, machine.Suspending:
			// In between: its supervisor moves it on.
		default:
			return nil, errdefs.New(errdefs.ErrUnavailable, "the builder of %s is %s: it cannot be used", project, rec.State)
		}
		select {
		case <-changed:
		case <-time.After(time.Second):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// use records a use of the project's running builder.
func (b *Builders) use(project string, inst *vmrun.Instance, start time.Time, resumed bool) *Builder {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m == nil {
		b.m = map[string]*Builder{}
	}
	bd := b.m[project]
	if bd == nil || bd.Inst != inst {
		bd = &Builder{Project: project, Inst: inst}
		b.m[project] = bd
	}
	bd.mu.Lock()
	defer bd.mu.Unlock()
	bd.busy++
	bd.Ready, bd.Resumed, bd.CacheReset = 0, false, false
	if !start.IsZero() {
		bd.Ready, bd.Resumed = time.Since(start), resumed
		bd.CacheReset = b.reset[project]
		delete(b.reset, project)
	}
	return bd
}

// whyFailed says why a builder's machine failed to start, from its last event: no room
// is ErrCapacity, anything else a failure of the infrastructure.
func (b *Builders) whyFailed(ctx context.Context, project, id string) error {
	evs, _ := b.Machines.Events(ctx, id)
	if len(evs) == 0 {
		return errdefs.New(errdefs.ErrUnavailable, "the builder of %s failed to start", project)
	}
	last := evs[len(evs)-1]
	if last.Type == string(machine.EvCapacity) {
		return errdefs.New(errdefs.ErrCapacity, "the builder of %s: %s", project, last.Message)
	}
	return errdefs.New(errdefs.ErrUnavailable, "the builder of %s failed to start: %s", project, last.Message)
}

func (b *Builders) projectLock(project string) *sync.Mutex {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.plocks == nil {
		b.plocks = map[string]*sync.Mutex{}
	}
	if b.plocks[project] == nil {
		b.plocks[project] = &sync.Mutex{}
	}
	return b.plocks[project]
}

// Release marks a use of the builder as done.
func (b *Builders) Release(bd *Builder) {
	bd.mu.Lock()
	bd.busy--
	bd.lastUsed = time.Now()
	bd.mu.Unlock()
}

// Discard stops a project's builder (after it failed); its cache volume stays, and the
// next build boots a new one on it.
func (b *Builders) Discard(ctx context.Context, bd *Builder) {
	id := b.builderID(bd.Project)
	if err := b.Machines.Stop(ctx, id); err != nil && !errors.Is(err, errdefs.ErrConflict) {
		b.logf("stopping the builder of %s: %v", bd.Project, err)
	}
	b.Machines.Wait(ctx, id, machine.Stopped, time.Minute)
}

// Running lists the projects whose builder runs.
func (b *Builders) Running() map[string]*Builder {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[string]*Builder{}
	for k, v := range b.m {
		if inst := b.Machines.Instance(b.builderID(k)); inst != nil && inst == v.Inst {
			out[k] = v
		}
	}
	return out
}

// Suspended lists the projects whose builder is suspended.
func (b *Builders) Suspended() []string {
	var out []string
	recs, _ := b.Machines.Internal(context.Background(), BuildersApp)
	for _, rec := range recs {
		if rec.State == machine.Suspended {
			out = append(out, projectOf(rec))
		}
	}
	return out
}

// StopIdle suspends builders idle longer than b.Idle (their VM saved to disk, its VMM
// gone) where the VMM can, and stops them otherwise; the supervisor does it, and the
// builder's cache is released first (Stopping). Either way the cache stays.
func (b *Builders) StopIdle(ctx context.Context) {
	b.adopt(ctx)
	for project, bd := range b.Running() {
		pl := b.projectLock(project)
		pl.Lock()
		bd.mu.Lock()
		idle := bd.busy == 0 && time.Since(bd.lastUsed) > b.Idle
		bd.mu.Unlock()
		if idle {
			b.stopIdle(ctx, project)
		}
		pl.Unlock()
	}
}

// adopt counts the builders running here that no build has used since kiln started
// (adopted after a restart): idle from now on, so that they too are suspended in time.
func (b *Builders) adopt(ctx context.Context) {
	recs, err := b.Machines.Internal(ctx, BuildersApp)
	if err != nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m == nil {
		b.m = map[string]*Builder{}
	}
	for _, rec := range recs {
		p := projectOf(rec)
		inst := b.Machines.Instance(rec.ID)
		if rec.State != machine.Started || inst == nil || p == "" {
			continue
		}
		if bd := b.m[p]; bd == nil || bd.Inst != inst {
			b.m[p] = &Builder{Project: p, Inst: inst, lastUsed: time.Now()}
		}
	}
}

// stopIdle suspends or stops an idle builder and waits until it has; the caller holds
// the project's lock.
func (b *Builders) stopIdle(ctx context.Context, project string) {
	id := b.builderID(project)
	if b.Machines.CanSuspend() {
		if err := b.Machines.Suspend(ctx, id); err == nil {
			b.logf("builder of %s was idle for %s: suspending it", project, b.Idle)
			// A failed suspend stops it instead; either way it is no longer running.
			b.waitNotRunning(ctx, id)
			return
		}
	}
	b.logf("builder of %s was idle for %s: stopping it (its cache stays)", project, b.Idle)
	if err := b.Machines.Stop(ctx, id); err == nil {
		b.waitNotRunning(ctx, id)
	}
}

// waitNotRunning waits until a builder's machine has left started and the states in
// between.
func (b *Builders) waitNotRunning(ctx context.Context, id string) {
	deadline := time.After(2 * time.Minute)
	for {
		changed := b.Machines.Changed()
		rec, err := b.Machines.Get(ctx, id)
		if err != nil || rec.State == machine.Suspended || rec.State == machine.Stopped || rec.State == machine.Failed {
			return
		}
		select {
		case <-changed:
		case <-time.After(time.Second):
		case <-deadline:
			return
		case <-ctx.Done():
			return
		}
	}
}

// Remove stops a project's builder machine and lets go of its network; its cache
// volume stays, and the next build starts the builder again on it. A project whose
// builder never ran here is ErrNotFound.
func (b *Builders) Remove(ctx context.Context, project string) error {
	pl := b.projectLock(project)
	pl.Lock()
	defer pl.Unlock()
	id := b.builderID(project)
	if _, err := b.Machines.Get(ctx, id); err != nil {
		return errdefs.New(errdefs.ErrNotFound, "project %s has no builder on this host", project)
	}
	if err := b.Machines.Stop(ctx, id); err != nil && !errors.Is(err, errdefs.ErrConflict) {
		return err
	}
	b.waitNotRunning(ctx, id)
	if rec, err := b.Machines.Get(ctx, id); err == nil && rec.State == machine.Suspended {
		// A suspended builder is stopped too: its saved VM goes.
		if err := b.Machines.Stop(ctx, id); err != nil && !errors.Is(err, errdefs.ErrConflict) {
			return err
		}
	}
	b.mu.Lock()
	delete(b.m, project)
	b.mu.Unlock()
	if b.Net != nil {
		if err := b.Net.Detach(ctx, id); err != nil {
			return fmt.Errorf("removing the network of the builder of %s: %w", project, err)
		}
	}
	return nil
}

// Close removes every builder of this host (their caches stay). A server does not call
// it: its builders keep running across a restart, like machines, and are adopted;
// tests do, and an operator removes one with `kiln build builder rm`.
func (b *Builders) Close(ctx context.Context) {
	recs, _ := b.Machines.Internal(ctx, BuildersApp)
	for _, rec := range recs {
		if err := b.Remove(ctx, projectOf(rec)); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			b.logf("removing the builder of %s: %v", projectOf(rec), err)
		}
	}
}

func (b *Builders) countReset(project string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.resets == nil {
		b.resets = map[string]int{}
	}
	b.resets[project]++
}

// CacheResets counts the project's cache resets since kiln started.
func (b *Builders) CacheResets(project string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.resets[project]
}
