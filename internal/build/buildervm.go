package build

// This file is what a builder VM is: the machines.Internal kind of BuildersApp, booted
// on its project's cache volume with buildkitd as its workload.

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	bkclient "github.com/moby/buildkit/client"

	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/store"
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

// Boot boots a project's builder VM (machines.Internal): the project's cache volume,
// its network, buildkitd as the workload.
func (b *Builders) Boot(ctx context.Context, rec store.Machine) (*vmrun.Instance, error) {
	project := projectOf(rec)
	if err := ValidProject(project); err != nil {
		return nil, fmt.Errorf("builder machine %s: %w", rec.ID, err)
	}
	inst, reset, err := b.boot(ctx, project, rec.ID)
	if reset {
		b.mu.Lock()
		if b.reset == nil {
			b.reset = map[string]bool{}
		}
		b.reset[project] = true
		b.mu.Unlock()
	}
	return inst, err
}

// Resumed checks that a resumed builder's buildkitd answers and marks its cache in use
// again (machines.Internal).
func (b *Builders) Resumed(ctx context.Context, rec store.Machine, inst *vmrun.Instance) error {
	return b.resume(ctx, inst)
}

// Stopping flushes the builder's cache and clears its in-use mark before its VM is
// saved or powered off (machines.Internal): should a saved VM never be resumed, the
// next builder finds the cache clean instead of resetting it.
func (b *Builders) Stopping(ctx context.Context, rec store.Machine, inst *vmrun.Instance) {
	b.release(ctx, projectOf(rec), inst)
}

// resume checks that buildkitd answers after a resume and marks the cache in use.
func (b *Builders) resume(ctx context.Context, inst *vmrun.Instance) error {
	c, err := inst.Agent.Connect(ctx, buildkitdSock)
	if err != nil {
		return fmt.Errorf("buildkitd does not answer after the resume: %w", err)
	}
	c.Close()
	st, err := inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"sh", "-c", "touch " + inUse + "; sync"}}, guest.IO{})
	if err == nil && st.Code != 0 {
		err = fmt.Errorf("exit status %d", st.Code)
	}
	if err != nil {
		return fmt.Errorf("marking the cache in use: %w", err)
	}
	return nil
}

// boot starts a builder VM on the project's cache volume and waits for buildkitd.
func (b *Builders) boot(ctx context.Context, project, id string) (inst *vmrun.Instance, reset bool, err error) {
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
		Rootfs: b.Rootfs, CPUs: b.CPUs, MemoryMiB: b.MemoryMiB, Hostname: "builder", Owner: id,
		Mounts: []vmrun.Mount{{Image: cache, Path: cacheDir}},
	}
	if b.Net != nil {
		l, err := b.Net.Attach(ctx, netApp(project), id)
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
func (b *Builders) release(ctx context.Context, project string, inst *vmrun.Instance) {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if st, err := inst.Agent.Exec(cctx, guest.ExecRequest{Argv: []string{"sh", "-c", releaseCache}}, guest.IO{}); err != nil || st.Code != 0 {
		b.logf("releasing the cache of %s: %v (status %d); the next builder resets it", project, err, st.Code)
	}
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
	// buildkitd is the builder machine's workload: the supervisor follows it and keeps
	// its output with the machine's.
	if _, err := inst.Agent.Spawn(ctx, "workload", guest.ExecRequest{Argv: argv}); err != nil {
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
			inst.Agent.Follow(ctx, "workload", 0, false, func(r guest.Record) error { tail = append(tail, r.Data...); return nil })
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
