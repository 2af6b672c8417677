package build

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	bkclient "github.com/moby/buildkit/client"

	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmrun"
	"github.com/kilnhq/kiln/internal/volume"
)

// buildkitdSock is where buildkitd listens inside a builder VM.
const buildkitdSock = "/run/buildkit/buildkitd.sock"

// cacheDir is where a builder's cache volume is mounted: buildkitd's state.
const cacheDir = "/var/lib/buildkit"

// inUse marks a cache volume whose builder has not stopped cleanly. BuildKit does not
// flush what it writes, so a builder killed mid-build can leave a snapshot its metadata
// calls complete but whose files never reached the disk; a cache found marked is reset.
const inUse = cacheDir + "/.kiln-in-use"

// prepareCache resets a cache its last builder did not release, then marks it in use.
const prepareCache = `if [ -e ` + inUse + ` ]; then find ` + cacheDir + ` -mindepth 1 -maxdepth 1 ! -name lost+found -exec rm -rf {} +; echo reset; fi; touch ` + inUse + `; sync`

// releaseCache flushes the cache and clears the mark: the next builder may trust it.
const releaseCache = `sync; rm -f ` + inUse + `; sync`

// Builders keeps one builder VM per project. Each project's BuildKit state lives on a
// volume of its own (DIR/PROJECT/cache.ext4) that only that project's VM ever mounts:
// the cache stays on this host, and projects never see each other's files.
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
	// Idle is how long a builder waits for the next build before it is stopped.
	Idle time.Duration
	// Capacity, when set, holds room for each running builder (machines and builders
	// share a host); a builder that finds none waits up to CapacityWait.
	Capacity     *capacity.Ledger
	CapacityWait time.Duration
	// Net, when set, gives each project's builder a network of its own, under the
	// machines' egress policy: RUN steps reach the internet, not the host's neighbours.
	Net Network
	Log io.Writer

	mu sync.Mutex
	m  map[string]*Builder
	// suspended holds idle builders saved to disk, resumed by the project's next build.
	suspended map[string]*Builder
	resets    map[string]int
	plocks    map[string]*sync.Mutex
}

// Network is the part of the machines' network that builders use. A project's lease is
// kept from its builder's first boot until Close, so that a resumed builder finds its
// TAP device.
type Network interface {
	Attach(ctx context.Context, app, id string) (network.Lease, error)
	Detach(ctx context.Context, id string) error
}

// netApp and netID name a project's builder on the network; app names cannot start with
// an underscore, so no app shares the network.
func netApp(project string) string { return "_build-" + project }
func netID(project string) string  { return "builder/" + project }

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

// Acquire returns the project's builder, booting it (and creating its cache volume) if
// it is not running. Release it when the build is done.
func (b *Builders) Acquire(ctx context.Context, project string) (*Builder, error) {
	// One project's builder changes one step at a time: two VMs must never mount its
	// cache volume, and a suspend must finish before a resume.
	pl := b.projectLock(project)
	pl.Lock()
	defer pl.Unlock()
	b.mu.Lock()
	if b.m == nil {
		b.m = map[string]*Builder{}
	}
	bd := b.m[project]
	if bd != nil {
		select {
		case <-bd.Inst.VM.Wait():
			// Its VM died: replace it (the cache volume stays).
			b.logf("builder of %s is gone; booting a new one on the same cache", project)
			delete(b.m, project)
			go bd.Inst.Destroy(context.WithoutCancel(ctx))
			bd = nil
		default:
		}
	}
	if bd != nil {
		bd.mu.Lock()
		bd.busy++
		bd.Ready, bd.Resumed = 0, false
		bd.mu.Unlock()
		b.mu.Unlock()
		return bd, nil
	}
	sus := b.suspended[project]
	delete(b.suspended, project)
	b.mu.Unlock()

	start := time.Now()
	if b.Capacity != nil {
		size := capacity.Size{CPUs: b.CPUs, MemoryMiB: b.MemoryMiB}
		if _, err := b.Capacity.Reserve(ctx, holdID(project), capacity.Request{Size: size}, b.CapacityWait, func(pos int, why error) {
			b.logf("the builder of %s waits for capacity (position %d): %v", project, pos, why)
		}); err != nil {
			if sus != nil {
				b.mu.Lock()
				b.suspended[project] = sus
				b.mu.Unlock()
			}
			return nil, err
		}
	}
	if sus != nil {
		err := b.resume(ctx, sus)
		if err == nil {
			sus.busy, sus.Ready, sus.Resumed = 1, time.Since(start), true
			b.mu.Lock()
			b.m[project] = sus
			b.mu.Unlock()
			return sus, nil
		}
		b.logf("resuming the builder of %s failed (%v): booting a new one", project, err)
		sus.Inst.Destroy(context.WithoutCancel(ctx))
	}
	inst, reset, err := b.boot(ctx, project)
	if err != nil {
		b.freeRoom(project)
		return nil, err
	}
	bd = &Builder{Project: project, Inst: inst, busy: 1, Ready: time.Since(start), CacheReset: reset}
	b.mu.Lock()
	b.m[project] = bd
	b.mu.Unlock()
	return bd, nil
}

func holdID(project string) string { return "builder/" + project }

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

// freeRoom gives back the capacity a project's builder held.
func (b *Builders) freeRoom(project string) {
	if b.Capacity != nil {
		b.Capacity.Release(holdID(project))
	}
}

// Release marks a use of the builder as done.
func (b *Builders) Release(bd *Builder) {
	bd.mu.Lock()
	bd.busy--
	bd.lastUsed = time.Now()
	bd.mu.Unlock()
}

// Discard destroys a project's builder VM (after it failed); its cache volume stays.
func (b *Builders) Discard(ctx context.Context, bd *Builder) {
	b.mu.Lock()
	if b.m[bd.Project] == bd {
		delete(b.m, bd.Project)
	}
	b.mu.Unlock()
	bd.Inst.Destroy(context.WithoutCancel(ctx))
	b.freeRoom(bd.Project)
}

// Running lists the projects whose builder runs.
func (b *Builders) Running() map[string]*Builder {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[string]*Builder{}
	for k, v := range b.m {
		out[k] = v
	}
	return out
}

// resume brings a suspended builder back and checks that buildkitd answers.
func (b *Builders) resume(ctx context.Context, bd *Builder) error {
	if err := bd.Inst.Resume(ctx); err != nil {
		return err
	}
	c, err := bd.Inst.Agent.Connect(ctx, buildkitdSock)
	if err != nil {
		return fmt.Errorf("buildkitd does not answer after the resume: %w", err)
	}
	c.Close()
	st, err := bd.Inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"sh", "-c", "touch " + inUse + "; sync"}}, guest.IO{})
	if err == nil && st.Code != 0 {
		err = fmt.Errorf("exit status %d", st.Code)
	}
	if err != nil {
		return fmt.Errorf("marking the cache in use: %w", err)
	}
	return nil
}

// Suspended lists the projects whose builder is suspended.
func (b *Builders) Suspended() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for p := range b.suspended {
		out = append(out, p)
	}
	return out
}

// StopIdle suspends builders idle longer than b.Idle (their VM saved to disk, its VMM
// gone) where the driver can, and stops them otherwise. Either way the cache stays.
func (b *Builders) StopIdle(ctx context.Context) {
	b.mu.Lock()
	var projects []string
	for p := range b.m {
		projects = append(projects, p)
	}
	b.mu.Unlock()
	for _, p := range projects {
		pl := b.projectLock(p)
		pl.Lock()
		b.stopIfIdle(ctx, p)
		pl.Unlock()
	}
}

// stopIfIdle suspends or stops the project's builder if it is still idle; the caller
// holds the project's lock.
func (b *Builders) stopIfIdle(ctx context.Context, project string) {
	b.mu.Lock()
	bd := b.m[project]
	idle := false
	if bd != nil {
		bd.mu.Lock()
		idle = bd.busy == 0 && time.Since(bd.lastUsed) > b.Idle
		bd.mu.Unlock()
	}
	if idle {
		delete(b.m, project)
	}
	b.mu.Unlock()
	if !idle {
		return
	}
	if b.RT.Driver.Capabilities().Snapshot {
		// The cache is released first: should the saved VM never be resumed (kiln
		// restarted), the next builder finds it clean instead of resetting it.
		b.release(ctx, bd)
		err := bd.Inst.Suspend(ctx)
		if err == nil {
			b.logf("builder of %s was idle for %s: suspended it", bd.Project, b.Idle)
			b.mu.Lock()
			if b.suspended == nil {
				b.suspended = map[string]*Builder{}
			}
			b.suspended[bd.Project] = bd
			b.mu.Unlock()
			b.freeRoom(bd.Project)
			return
		}
		b.logf("suspending the idle builder of %s failed (%v): stopping it", bd.Project, err)
	} else {
		b.logf("builder of %s was idle for %s: stopping it (its cache stays)", bd.Project, b.Idle)
	}
	b.release(ctx, bd)
	bd.Inst.Shutdown(ctx, 10*time.Second)
	bd.Inst.Destroy(context.WithoutCancel(ctx))
	b.freeRoom(bd.Project)
}

// Close stops every builder.
func (b *Builders) Close(ctx context.Context) {
	b.mu.Lock()
	all := b.m
	sus := b.suspended
	b.m, b.suspended = nil, nil
	b.mu.Unlock()
	for _, bd := range all {
		b.release(ctx, bd)
		bd.Inst.Destroy(context.WithoutCancel(ctx))
		b.freeRoom(bd.Project)
	}
	for _, bd := range sus {
		bd.Inst.Destroy(context.WithoutCancel(ctx))
	}
	if b.Net != nil {
		b.mu.Lock()
		var projects []string
		for p := range b.plocks { // every project that may have booted a builder
			projects = append(projects, p)
		}
		b.mu.Unlock()
		for _, p := range projects {
			b.Net.Detach(context.WithoutCancel(ctx), netID(p))
		}
	}
}

// boot starts a builder VM on the project's cache volume and waits for buildkitd.
func (b *Builders) boot(ctx context.Context, project string) (inst *vmrun.Instance, reset bool, err error) {
	cache := b.CachePath(project)
	if _, err := os.Stat(cache); os.IsNotExist(err) {
		if err := os.MkdirAll(filepath.Dir(cache), 0o755); err != nil {
			return nil, false, err
		}
		if err := volume.Create(ctx, cache, b.CacheBytes, ""); err != nil {
			return nil, false, fmt.Errorf("creating the cache volume of %s: %w", project, err)
		}
		b.logf("created the cache volume of %s (%d GiB)", project, b.CacheBytes>>30)
	}
	spec := vmrun.Spec{
		Rootfs: b.Rootfs, CPUs: b.CPUs, MemoryMiB: b.MemoryMiB, Hostname: "builder",
		Mounts: []vmrun.Mount{{Image: cache, Path: cacheDir}},
	}
	if b.Net != nil {
		l, err := b.Net.Attach(ctx, netApp(project), netID(project))
		if err != nil {
			return nil, false, fmt.Errorf("the network of the builder of %s: %w", project, err)
		}
		spec.NICs = []vmm.NIC{{HostDev: l.TAP, MAC: l.MAC}}
		spec.Cmdline = l.Cmdline()
	}
	inst, err = b.RT.Boot(ctx, spec)
	if err != nil {
		return nil, false, fmt.Errorf("booting the builder of %s: %w", project, err)
	}
	var out strings.Builder
	st, err := inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"sh", "-c", prepareCache}}, guest.IO{Stdout: &out})
	if err == nil && st.Code != 0 {
		err = fmt.Errorf("exit status %d", st.Code)
	}
	if err != nil {
		inst.Destroy(context.WithoutCancel(ctx))
		return nil, false, fmt.Errorf("preparing the cache of %s: %w", project, err)
	}
	if strings.Contains(out.String(), "reset") {
		b.logf("the cache of %s was reset: its last builder did not stop cleanly, so what BuildKit left on it cannot be trusted", project)
		b.countReset(project)
		reset = true
	}
	if err := b.startBuildkitd(ctx, inst); err != nil {
		inst.Destroy(context.WithoutCancel(ctx))
		return nil, false, fmt.Errorf("starting buildkitd in the builder of %s: %w", project, err)
	}
	return inst, reset, nil
}

// release flushes a builder's cache and clears its in-use mark before the VM stops.
func (b *Builders) release(ctx context.Context, bd *Builder) {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if st, err := bd.Inst.Agent.Exec(cctx, guest.ExecRequest{Argv: []string{"sh", "-c", releaseCache}}, guest.IO{}); err != nil || st.Code != 0 {
		b.logf("releasing the cache of %s: %v (status %d); the next builder resets it", bd.Project, err, st.Code)
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

func (b *Builders) startBuildkitd(ctx context.Context, inst *vmrun.Instance) error {
	argv := []string{"/usr/local/bin/buildkitd",
		"--addr", "unix://" + buildkitdSock,
		"--root", cacheDir,
		"--oci-worker-net=host",
		"--oci-worker-snapshotter=overlayfs",
		"--oci-worker-gc",
		fmt.Sprintf("--oci-worker-gc-keepstorage=%d", b.KeepBytes>>20), // MiB
	}
	if _, err := inst.Agent.Spawn(ctx, "buildkitd", guest.ExecRequest{Argv: argv}); err != nil {
		return err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := inst.Agent.Connect(ctx, buildkitdSock)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			var tail []byte
			inst.Agent.Follow(ctx, "buildkitd", 0, false, func(r guest.Record) error { tail = append(tail, r.Data...); return nil })
			if len(tail) > 2000 {
				tail = tail[len(tail)-2000:]
			}
			return fmt.Errorf("buildkitd did not answer within 60s: %v\n%s", err, tail)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Client is a BuildKit client for the builder's buildkitd, over the agent channel.
func (bd *Builder) Client(ctx context.Context) (*bkclient.Client, error) {
	return bkclient.New(ctx, "", bkclient.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
		return bd.Inst.Agent.Connect(ctx, buildkitdSock)
	}))
}
