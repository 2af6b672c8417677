package machines

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/supervisor"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// vmRuntime is the supervisor's runtime port over vmrun: it turns a machine's config
// into a VM (its image's root filesystem, its volumes, its network) and keeps the saved
// VMs of suspended machines.
type vmRuntime struct {
	vms    *vmrun.Runtime
	store  store.Store
	images Images
	cache  image.Cache
	net    Network
	log    io.Writer

	internal map[string]Internal
	secrets  func(ctx context.Context, app string, version int) (map[string]string, error)

	mu    sync.Mutex
	saved map[string]*vmInstance
}

// Internal is a kind of machine kiln runs for itself, such as a project's builder: its
// VM, disks and workload are made by Boot instead of from an image and its config. The
// supervisor runs it like any machine: capacity, suspend and resume, adoption after a
// restart. Its app (a name users cannot create: machine.InternalApp) picks the kind.
type Internal interface {
	// Boot boots the machine's VM (owned by rec.ID, so that it is adopted after a
	// restart) and spawns its workload, named "workload". On error nothing is left.
	Boot(ctx context.Context, rec store.Machine) (*vmrun.Instance, error)
	// Resumed runs once a saved VM runs again; an error makes the machine boot cold.
	Resumed(ctx context.Context, rec store.Machine, inst *vmrun.Instance) error
	// Stopping runs before the VM is saved or powered off.
	Stopping(ctx context.Context, rec store.Machine, inst *vmrun.Instance)
}

var _ supervisor.Runtime = (*vmRuntime)(nil)

// rootfs resolves an image to its root filesystem: once per boot (and once when a
// request is checked).
func (r *vmRuntime) rootfs(ctx context.Context, ref string) (image.Rootfs, error) {
	img, err := r.images.Resolve(ctx, ref)
	if err != nil {
		return image.Rootfs{}, err
	}
	return r.cache.Rootfs(ctx, img, r.log)
}

// Boot starts the machine's VM, with its volumes, and its workload.
func (r *vmRuntime) Boot(ctx context.Context, rec store.Machine, cfg api.MachineConfig) (supervisor.VM, error) {
	if k := r.internal[rec.App]; k != nil {
		start := time.Now()
		inst, err := k.Boot(ctx, rec)
		if err != nil {
			return nil, err
		}
		metrics.MachineBoot.WithLabelValues(rec.App).Observe(time.Since(start).Seconds())
		return &vmInstance{rt: r, id: rec.ID, inst: inst, rec: rec, kind: k}, nil
	}
	id := rec.ID
	rfs, err := r.rootfs(ctx, cfg.Image)
	if err != nil {
		return nil, err
	}
	w := machine.Workload(cfg, rfs.Run)
	if len(w.Argv) == 0 {
		return nil, errdefs.Invalid("image %s has no command and config.init sets none", cfg.Image)
	}
	secrets, err := r.secretsOf(ctx, rec)
	if err != nil {
		return nil, err
	}
	w.Env = withSecrets(w.Env, secrets)
	if w.Files, err = guestFiles(cfg.Files, secrets); err != nil {
		return nil, err
	}
	var mounts []vmrun.Mount
	for _, mt := range cfg.Mounts {
		v, err := r.store.GetVolume(ctx, rec.App, mt.Volume)
		if err != nil {
			return nil, err
		}
		m := vmrun.Mount{Image: v.Path, Path: mt.Path}
		if w.UID != 0 || w.GID != 0 {
			m.Owner = &vmrun.Owner{UID: w.UID, GID: w.GID}
		}
		mounts = append(mounts, m)
	}
	spec := vmrun.Spec{Rootfs: rfs.Path, CPUs: cfg.Guest.CPUs, MemoryMiB: cfg.Guest.MemoryMB, Owner: id, Hostname: id, Mounts: mounts}
	if r.net != nil {
		l, err := r.net.Attach(ctx, rec.App, id)
		if err != nil {
			return nil, fmt.Errorf("private network: %w", err)
		}
		spec.NICs = []vmm.NIC{{HostDev: l.TAP, MAC: l.MAC}}
		spec.Cmdline = l.Cmdline()
	}
	// Boot latency is the VM's and its workload's: the image and the network are ready.
	start := time.Now()
	inst, err := r.vms.Boot(ctx, spec)
	if err != nil {
		return nil, err
	}
	if _, err := inst.Agent.Spawn(ctx, "workload", w); err != nil {
		inst.Destroy(context.WithoutCancel(ctx))
		return nil, err
	}
	metrics.MachineBoot.WithLabelValues(rec.App).Observe(time.Since(start).Seconds())
	return &vmInstance{rt: r, id: id, inst: inst, as: w, rec: rec}, nil
}

func (r *vmRuntime) Resume(ctx context.Context, id string) (supervisor.VM, error) {
	r.mu.Lock()
	v := r.saved[id]
	delete(r.saved, id)
	r.mu.Unlock()
	if v == nil {
		return nil, nil
	}
	start := time.Now()
	err := v.inst.Resume(ctx)
	if err == nil && v.kind != nil {
		err = v.kind.Resumed(ctx, v.rec, v.inst)
	}
	if err != nil {
		v.inst.Destroy(context.WithoutCancel(ctx))
		return nil, err
	}
	metrics.MachineResume.WithLabelValues(v.rec.App).Observe(time.Since(start).Seconds())
	return v, nil
}

func (r *vmRuntime) Saved(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.saved[id] != nil
}

func (r *vmRuntime) Discard(ctx context.Context, id string) {
	r.mu.Lock()
	v := r.saved[id]
	delete(r.saved, id)
	r.mu.Unlock()
	if v != nil {
		v.inst.Destroy(context.WithoutCancel(ctx))
	}
}

func (r *vmRuntime) Owned(ctx context.Context) ([]supervisor.Owned, error) {
	owned, err := r.vms.ListOwned()
	if err != nil {
		return nil, err
	}
	out := make([]supervisor.Owned, 0, len(owned))
	for _, o := range owned {
		out = append(out, supervisor.Owned{ID: o.ID, Owner: o.Owner})
	}
	return out, nil
}

// as is how execs in an adopted or restored VM run: the image is resolved again, once,
// as the VM's first boot did.
func (r *vmRuntime) as(ctx context.Context, rec store.Machine) guest.ExecRequest {
	if r.internal[rec.App] != nil {
		return guest.ExecRequest{}
	}
	cfg := machine.DecodeConfig(rec.Config)
	rfs, err := r.rootfs(ctx, cfg.Image)
	if err != nil {
		return guest.ExecRequest{}
	}
	w := machine.Workload(cfg, rfs.Run)
	secrets, _ := r.secretsOf(ctx, rec)
	w.Env = withSecrets(w.Env, secrets)
	return w
}

// secretsOf is the app's secrets at the version the machine's metadata names
// (kiln_secrets_version, set by deploys) or else the latest; none without a source.
func (r *vmRuntime) secretsOf(ctx context.Context, rec store.Machine) (map[string]string, error) {
	if r.secrets == nil {
		return nil, nil
	}
	version := 0
	if md, err := r.store.Metadata(ctx, rec.ID); err == nil {
		version, _ = strconv.Atoi(md[MetaSecretsVersion])
	}
	vals, err := r.secrets(ctx, rec.App, version)
	if err != nil {
		return nil, fmt.Errorf("reading the app's secrets: %w", err)
	}
	return vals, nil
}

// withSecrets adds secrets to a workload's environment, after the config's env: a
// secret wins over a plain variable of its name.
func withSecrets(env []string, secrets map[string]string) []string {
	for _, k := range slices.Sorted(maps.Keys(secrets)) {
		env = append(env, k+"="+secrets[k])
	}
	return env
}

// guestFiles turns config.files into what the agent writes: raw_value, or the named
// secret, decoded from base64.
func guestFiles(files []api.File, secrets map[string]string) ([]guest.File, error) {
	var out []guest.File
	for _, f := range files {
		enc := ""
		switch {
		case f.RawValue != nil:
			enc = *f.RawValue
		case f.SecretName != nil:
			v, ok := secrets[*f.SecretName]
			if !ok {
				return nil, errdefs.Invalid("config.files %s names secret %s, which the app does not have: set it (kiln secrets set %s=BASE64)", f.GuestPath, *f.SecretName, *f.SecretName)
			}
			enc = v
		}
		data, err := base64.StdEncoding.DecodeString(enc)
		if err != nil {
			return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "config.files %s: its contents are not base64", f.GuestPath)
		}
		out = append(out, guest.File{Path: f.GuestPath, Mode: f.Mode, Data: data})
	}
	return out, nil
}

// MetaSecretsVersion is the metadata key that pins the secrets version a machine boots
// with.
const MetaSecretsVersion = "kiln_secrets_version"

func (r *vmRuntime) Adopt(ctx context.Context, o supervisor.Owned, rec store.Machine) (supervisor.VM, error) {
	inst, err := r.vms.Adopt(ctx, o.ID)
	if err != nil {
		if inst != nil {
			if ctx.Err() != nil {
				inst.Release()
			} else {
				inst.Destroy(context.WithoutCancel(ctx))
			}
		}
		return nil, err
	}
	return &vmInstance{rt: r, id: o.Owner, inst: inst, as: r.as(ctx, rec), rec: rec, kind: r.internal[rec.App]}, nil
}

func (r *vmRuntime) Restore(ctx context.Context, o supervisor.Owned) error {
	inst, err := r.vms.Saved(ctx, o.ID)
	if err != nil {
		if inst != nil {
			inst.Destroy(context.WithoutCancel(ctx))
		}
		return err
	}
	v := &vmInstance{rt: r, id: o.Owner, inst: inst}
	if rec, err := r.store.GetMachine(ctx, o.Owner); err == nil {
		v.as, v.rec, v.kind = r.as(ctx, rec), rec, r.internal[rec.App]
	}
	r.mu.Lock()
	r.saved[o.Owner] = v
	r.mu.Unlock()
	return nil
}

func (r *vmRuntime) DestroyOwned(ctx context.Context, o supervisor.Owned) {
	inst, _ := r.vms.Adopt(ctx, o.ID)
	if inst != nil {
		inst.Destroy(context.WithoutCancel(ctx))
	}
}

// vmInstance is a machine's VM: a vmrun instance running the workload.
type vmInstance struct {
	rt   *vmRuntime
	id   string
	inst *vmrun.Instance
	as   guest.ExecRequest
	// rec is the machine's record as the VM was made (its app); kind is set for an
	// internal machine.
	rec  store.Machine
	kind Internal
	// agentMu guards inst.Agent where it changes while others may read it: a reconnect
	// while the workload is followed, read by a scrape (Usage).
	agentMu sync.Mutex
}

// agent is the VM's agent connection now.
func (v *vmInstance) agent() *guest.Client {
	v.agentMu.Lock()
	defer v.agentMu.Unlock()
	return v.inst.Agent
}

func (v *vmInstance) logf(format string, args ...any) {
	if v.rt.log != nil {
		fmt.Fprintf(v.rt.log, "kiln: machine %s: "+format+"\n", append([]any{v.id}, args...)...)
	}
}

// Follow passes the workload's output on until it exits. If the stream fails it follows
// again; if the agent connection itself is gone while the VM lives, it reconnects. Either
// way it goes on from where the output stopped.
func (v *vmInstance) Follow(ctx context.Context, offset int64, add func(guest.Record) error) (*int, error) {
	next := offset
	pass := func(rec guest.Record) error {
		next = rec.Offset + int64(len(rec.Data))
		return add(rec)
	}
	for attempt := 0; ; attempt++ {
		last, err := v.agent().Follow(ctx, "workload", next, true, pass)
		if err == nil {
			if last.Exit == nil {
				return nil, nil
			}
			code := last.Exit.Code
			return &code, nil
		}
		if ctx.Err() != nil || attempt == 3 {
			return nil, err
		}
		select {
		case <-v.inst.VM.Wait():
			return nil, err
		default:
		}
		select {
		case <-v.agent().Done():
		default:
			// The connection lives; only this stream failed. Dialing again would reset
			// the guest's session and cut every other stream on it (a builder's BuildKit
			// connection and its session, whose secrets a build then waits for forever).
			v.logf("following the workload: %v; following again", err)
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(time.Second):
			}
			continue
		}
		v.logf("agent connection lost (%v); reconnecting", err)
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		c, derr := guest.Dial(dctx, v.inst.VM.DialAgent)
		cancel()
		if derr != nil {
			return nil, err
		}
		v.agentMu.Lock()
		v.inst.Agent.Close()
		v.inst.Agent = c
		v.agentMu.Unlock()
	}
}

func (v *vmInstance) Signal(ctx context.Context, sig int) error {
	return v.agent().SignalSupervised(ctx, "workload", sig)
}

// PowerOff stops the VM within grace and a minute more whatever the guest does: a guest
// that no longer answers is killed rather than waited for.
func (v *vmInstance) PowerOff(ctx context.Context, grace time.Duration) {
	bctx, cancel := context.WithTimeout(ctx, grace+time.Minute)
	defer cancel()
	if v.kind != nil {
		v.kind.Stopping(bctx, v.rec, v.inst)
	}
	if err := v.inst.Shutdown(bctx, grace); err != nil {
		v.logf("powering off: %v; killing its VM", err)
		v.inst.Destroy(context.WithoutCancel(ctx))
	}
}

func (v *vmInstance) Save(ctx context.Context) error {
	if v.kind != nil {
		v.kind.Stopping(ctx, v.rec, v.inst)
	}
	if err := v.inst.Suspend(ctx); err != nil {
		return err
	}
	v.rt.mu.Lock()
	v.rt.saved[v.id] = v
	v.rt.mu.Unlock()
	return nil
}

func (v *vmInstance) Release() { v.inst.Release() }

func (v *vmInstance) Sync(ctx context.Context) error { return v.agent().Sync(ctx) }

func (v *vmInstance) Exec(ctx context.Context, req guest.ExecRequest, pio guest.IO) (*guest.Process, error) {
	return v.agent().Start(ctx, req, pio)
}

func (v *vmInstance) As() guest.ExecRequest { return v.as }

func (v *vmInstance) Ps(ctx context.Context) ([]guest.ProcessStat, error) {
	return v.agent().Ps(ctx)
}
