// Package vmrun boots one VM with its agent connected and tears it down without leaving
// anything behind. It is what `kiln vm run`, the tests and the benchmarks use; the
// machine service will build on it. Every VM gets a directory under DATA_DIR/vms holding
// a record written before anything is created, so a kiln process killed at any point
// leaves enough behind for the next one to find and remove what it made (Reap).
package vmrun

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kilnhq/kiln/internal/assets"
	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/cgroup"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/volume"
)

// Runtime boots VMs on this host.
type Runtime struct {
	DataDir string
	// Driver boots new VMs. Drivers, if set, holds every driver kiln has, by name: a VM an
	// earlier kiln started under another one (the operator changed --vmm) is adopted and
	// torn down by its own, so that its jail, its user and its devices are released.
	Driver  vmm.Driver
	Drivers map[string]vmm.Driver
	Assets  assets.Set
	// Accel is passed to the driver; resolve it once with ResolveAccel.
	Accel vmm.Accel
	// BootTimeout bounds how long a guest may take to answer after Start; zero means
	// DefaultBootTimeout.
	BootTimeout time.Duration
	// UIDs are the host users VMMs run as, one per VM; zero means DefaultUIDs. Data dirs
	// sharing a host may share a range: claims are host-wide (ClaimDir).
	UIDs UIDRange
	// MemoryOverheadMiB is what a VM's cgroup allows beyond its RAM for the VMM; zero
	// means DefaultMemoryOverheadMiB.
	MemoryOverheadMiB int
}

// Mount attaches an ext4 image read-write at an absolute path in the guest.
type Mount struct {
	Image string
	Path  string
	// Owner, if set, is given the mount's root directory while the filesystem is still
	// empty, so that a workload running as a user can write to a new volume.
	Owner *Owner `json:",omitempty"`
}

// Owner is a numeric user and group.
type Owner struct{ UID, GID uint32 }

// Spec is one VM to boot.
type Spec struct {
	// Rootfs is an ext4 root filesystem (an image's, say); empty means the default one.
	Rootfs    string
	CPUs      int
	MemoryMiB int
	Mounts    []Mount
	Hostname  string
	// Owner, when set, makes the VM outlive this kiln process: it belongs to the named
	// machine, is not reaped, and is found again with Adopt.
	Owner string
	// NICs are handed to the VMM as they are; their TAP devices belong to the caller.
	NICs []vmm.NIC
	// Cmdline is added to the kernel command line (the guest's network settings, say).
	Cmdline string
}

// Timing splits a boot into its phases.
type Timing struct {
	VMMStart time.Duration // spawning the VMM until it accepts commands
	Kernel   time.Duration // guest clock at kiln-init start
	Init     time.Duration // kiln-init start to agent ready (guest clock)
	Total    time.Duration // Boot called until the agent answered
}

// Instance is a booted VM with its agent.
type Instance struct {
	ID  string
	Dir string
	// Config is what the VM was created with; a restore needs the same.
	Config vmm.Config
	VM     vmm.VM
	Agent  *guest.Client
	Timing Timing
	rt     *Runtime
	leases []*volume.Lease
}

// record is the on-disk claim to a VM's resources. An ephemeral VM belongs to the kiln
// process that made it and is reaped when that process is gone; a machine's VM belongs
// to the machine (Owner) and outlives kiln restarts, to be adopted again.
type record struct {
	ID         string     `json:"id"`
	OwnerPID   int        `json:"owner_pid,omitempty"`
	OwnerStart uint64     `json:"owner_start,omitempty"`
	Owner      string     `json:"owner,omitempty"`
	Mounts     []Mount    `json:"mounts,omitempty"`
	Handle     vmm.Handle `json:"handle"`
	// Config is what the VMM was created with, for a resume by a later kiln.
	Config vmm.Config `json:"config"`
}

// LockDisk takes a disk's attach lock for holder, as a VM does, so that a caller can
// change the image (extend it) while no VM may attach it.
func (rt *Runtime) LockDisk(image, holder string) (*volume.Lease, error) {
	return rt.locks().Acquire(image, holder)
}

func (rt *Runtime) vmsDir() string      { return filepath.Join(rt.DataDir, "vms") }
func (rt *Runtime) locks() volume.Locks { return volume.Locks{Dir: filepath.Join(rt.DataDir, "locks")} }

func newID() string {
	var b [6]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func writeRecord(dir string, r record) error {
	b, _ := json.MarshalIndent(r, "", "  ")
	return atomicfile.WriteFile(filepath.Join(dir, "record.json"), b, 0o600)
}

// ValidateMounts checks mounts before anything is created.
func ValidateMounts(ms []Mount) ([]volume.Info, error) {
	var infos []volume.Info
	seen := map[string]bool{}
	for _, m := range ms {
		if err := vmm.CheckMountPath(m.Path); err != nil {
			return nil, err
		}
		info, err := volume.Inspect(m.Image)
		if err != nil {
			return nil, err
		}
		if seen[info.UUID] {
			return nil, errdefs.Invalid("disk %s is given twice (or shares a UUID with another disk)", m.Image)
		}
		seen[info.UUID] = true
		infos = append(infos, info)
	}
	return infos, nil
}

// Boot creates and starts a VM and connects its agent. On error nothing is left.
func (rt *Runtime) Boot(ctx context.Context, spec Spec) (inst *Instance, err error) {
	infos, err := ValidateMounts(spec.Mounts)
	if err != nil {
		return nil, err
	}
	rootfs := rt.Assets.Rootfs
	if spec.Rootfs != "" {
		rootfs = spec.Rootfs
	}
	root, err := volume.Inspect(rootfs)
	if err != nil {
		return nil, fmt.Errorf("root filesystem: %w", err)
	}
	id := newID()
	dir := filepath.Join(rt.vmsDir(), id)
	cfg := vmm.Config{
		ID: id, Dir: dir, CPUs: spec.CPUs, MemoryMiB: spec.MemoryMiB,
		Kernel: rt.Assets.Kernel, Initramfs: rt.Assets.Initramfs, Accel: rt.Accel, NICs: spec.NICs,
		NoACPI: rt.Assets.KernelNoACPI,
	}
	// Refuse bad sizes before anything exists.
	if err := vmm.Validate(cfg); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	inst = &Instance{ID: id, Dir: dir, rt: rt}
	defer func() {
		if err != nil {
			inst.Destroy(context.WithoutCancel(ctx))
		}
	}()
	if confined() {
		// The VMM's user and cgroup are recorded before either is taken or made, so that
		// Reap finds them whenever kiln dies.
		if cfg.Confine, err = rt.claimUser(id); err != nil {
			return inst, err
		}
		cfg.Confine.Cgroup = cgroup.Name(id)
	}
	inst.Config = cfg
	rec := record{ID: id, Owner: spec.Owner, Mounts: spec.Mounts, Config: cfg}
	if spec.Owner == "" {
		rec.OwnerPID, rec.OwnerStart = os.Getpid(), vmm.ProcStart(os.Getpid())
	}
	if err := writeRecord(dir, rec); err != nil {
		return inst, err
	}
	if err := rt.makeCgroup(cfg); err != nil {
		return inst, err
	}
	cmdline := "kiln.root=" + root.UUID
	disks := []vmm.Disk{{Path: rootfs, ReadOnly: true}}
	for i, m := range spec.Mounts {
		lease, err := rt.locks().Acquire(m.Image, id)
		if err != nil {
			return inst, err
		}
		inst.leases = append(inst.leases, lease)
		// A disk whose file was grown while it was in use gets its filesystem grown now,
		// under the lock, before the guest mounts it.
		if infos[i].FileSize > infos[i].Total+(4<<20) {
			if err := volume.Grow(ctx, m.Image); err != nil {
				return inst, fmt.Errorf("growing the filesystem of %s: %w", m.Image, err)
			}
		}
		disks = append(disks, vmm.Disk{Path: m.Image})
		cmdline += fmt.Sprintf(" kiln.disk=%s:%s", infos[i].UUID, filepath.Clean(m.Path))
		if m.Owner != nil {
			cmdline += fmt.Sprintf(":%d:%d", m.Owner.UID, m.Owner.GID)
		}
	}
	if spec.Hostname != "" {
		cmdline += " kiln.hostname=" + spec.Hostname
	}
	if spec.Cmdline != "" {
		cmdline += " " + spec.Cmdline
	}
	start := time.Now()
	cfg.Cmdline, cfg.Disks = cmdline, disks
	inst.Config = cfg
	vm, err := rt.Driver.Create(ctx, cfg)
	if err != nil {
		return inst, err
	}
	inst.VM = vm
	rec.Handle, rec.Config = vm.Handle(), cfg
	if err := writeRecord(dir, rec); err != nil {
		return inst, err
	}
	inst.Timing.VMMStart = time.Since(start)
	if err := vm.Start(ctx); err != nil {
		return inst, err
	}
	if err := inst.connect(ctx); err != nil {
		return inst, err
	}
	inst.Timing.Total = time.Since(start)
	inst.Timing.Kernel = time.Duration(inst.Agent.Hello.InitStartMS) * time.Millisecond
	inst.Timing.Init = time.Duration(inst.Agent.Hello.ReadyMS-inst.Agent.Hello.InitStartMS) * time.Millisecond
	return inst, nil
}

// Owned describes a VM that belongs to a machine.
type Owned struct {
	ID    string
	Owner string
}

// ListOwned lists the VMs on this host that belong to machines.
func (rt *Runtime) ListOwned() ([]Owned, error) {
	ents, err := os.ReadDir(rt.vmsDir())
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Owned
	for _, e := range ents {
		rec, err := readRecord(filepath.Join(rt.vmsDir(), e.Name()))
		if err == nil && rec.Owner != "" {
			out = append(out, Owned{ID: rec.ID, Owner: rec.Owner})
		}
	}
	return out, nil
}

func readRecord(dir string) (record, error) {
	var rec record
	b, err := os.ReadFile(filepath.Join(dir, "record.json"))
	if err != nil {
		return rec, err
	}
	return rec, json.Unmarshal(b, &rec)
}

// driverOf is the driver that started the VM of h.
func (rt *Runtime) driverOf(h vmm.Handle) vmm.Driver {
	if d, ok := rt.Drivers[h.Driver]; ok {
		return d
	}
	return rt.Driver
}

// Adopt takes over a machine's VM left running by an earlier kiln process: it
// re-attaches to the VMM, takes the disk locks again and connects the agent. A VM whose
// VMM is gone comes back as an error of kind ErrUnavailable; Destroy it.
func (rt *Runtime) Adopt(ctx context.Context, id string) (*Instance, error) {
	dir := filepath.Join(rt.vmsDir(), id)
	rec, err := readRecord(dir)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrNotFound, err, "vm %s has no record", id)
	}
	inst := &Instance{ID: id, Dir: dir, rt: rt, Config: rec.Config}
	vm, err := rt.driverOf(rec.Handle).Recover(ctx, rec.Handle)
	if vm != nil {
		inst.VM = vm
	}
	if err != nil {
		return inst, errdefs.Wrap(errdefs.ErrUnavailable, err, "vm %s", id)
	}
	if !vmm.Alive(rec.Handle.PID, rec.Handle.PIDStart) {
		return inst, errdefs.New(errdefs.ErrUnavailable, "vm %s: its VMM is gone", id)
	}
	for _, m := range rec.Mounts {
		lease, err := rt.locks().Acquire(m.Image, id)
		if err != nil {
			return inst, err
		}
		inst.leases = append(inst.leases, lease)
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if inst.Agent, err = guest.Dial(cctx, vm.DialAgent); err != nil {
		return inst, errdefs.Wrap(errdefs.ErrUnavailable, err, "vm %s: agent", id)
	}
	return inst, nil
}

// SnapshotDir is where Suspend saves a VM.
func (inst *Instance) SnapshotDir() string { return filepath.Join(inst.Dir, "snapshot") }

// Suspend saves the VM (memory and devices; disks flushed by the guest first) and ends its
// VMM. The instance keeps its directory, record and disk locks; Resume brings it back.
func (inst *Instance) Suspend(ctx context.Context) error {
	s, ok := inst.VM.(vmm.Snapshotter)
	if !ok || !inst.rt.Driver.Capabilities().Snapshot {
		return errdefs.New(errdefs.ErrInvalid, "the %s driver cannot suspend VMs", inst.rt.Driver.Name())
	}
	if err := inst.Agent.Sync(ctx); err != nil {
		return fmt.Errorf("flushing the guest's disks: %w", err)
	}
	if err := s.Snapshot(ctx, inst.SnapshotDir()); err != nil {
		os.RemoveAll(inst.SnapshotDir())
		s.Resume(context.WithoutCancel(ctx))
		return err
	}
	inst.Agent.Close()
	inst.Agent = nil
	if err := inst.VM.Kill(ctx); err != nil {
		return err
	}
	// The cgroup holds a running VMM only; Resume makes it again.
	return removeCgroup(inst.Config.Confine.Cgroup)
}

// Resume starts the VM again from what Suspend saved, reconnects the agent and corrects
// the guest's clock. The snapshot is discarded once the VM runs.
func (inst *Instance) Resume(ctx context.Context) error {
	// The driver that saved it restores it, whatever this kiln boots new VMs on.
	d := inst.rt.Driver
	if rec, err := readRecord(inst.Dir); err == nil {
		d = inst.rt.driverOf(rec.Handle)
	}
	r, ok := d.(vmm.Restorer)
	if !ok {
		return errdefs.New(errdefs.ErrInvalid, "the %s driver cannot resume VMs", d.Name())
	}
	// The cgroup is gone since the suspend (and so is every cgroup after a host reboot).
	if err := inst.rt.makeCgroup(inst.Config); err != nil {
		return err
	}
	vm, err := r.Restore(ctx, inst.Config, inst.SnapshotDir())
	if err != nil {
		return err
	}
	inst.VM = vm
	rec, err := readRecord(inst.Dir)
	if err == nil {
		rec.Handle = vm.Handle()
		err = writeRecord(inst.Dir, rec)
	}
	if err != nil {
		return err
	}
	if err := inst.connect(ctx); err != nil {
		return err
	}
	if err := inst.Agent.SetTime(ctx, time.Now()); err != nil {
		return fmt.Errorf("correcting the guest clock: %w", err)
	}
	return os.RemoveAll(inst.SnapshotDir())
}

// Saved returns a suspended VM left by an earlier kiln process, ready for Resume.
func (rt *Runtime) Saved(ctx context.Context, id string) (*Instance, error) {
	dir := filepath.Join(rt.vmsDir(), id)
	rec, err := readRecord(dir)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrNotFound, err, "vm %s has no record", id)
	}
	inst := &Instance{ID: id, Dir: dir, rt: rt, Config: rec.Config}
	vm, _ := rt.driverOf(rec.Handle).Recover(ctx, rec.Handle)
	inst.VM = vm
	if _, err := os.Stat(inst.SnapshotDir()); err != nil {
		return inst, errdefs.New(errdefs.ErrNotFound, "vm %s has no saved state", id)
	}
	for _, m := range rec.Mounts {
		lease, err := rt.locks().Acquire(m.Image, id)
		if err != nil {
			return inst, err
		}
		inst.leases = append(inst.leases, lease)
	}
	return inst, nil
}

// Release lets go of a running VM without stopping it, for a kiln that is exiting and
// whose successor will Adopt it.
func (inst *Instance) Release() {
	if inst.Agent != nil {
		inst.Agent.Close()
	}
	if inst.VM != nil {
		inst.VM.Detach()
	}
	for _, l := range inst.leases {
		l.Release()
	}
}

// DefaultBootTimeout: software emulation boots in seconds; a guest silent for this long
// has hung.
const DefaultBootTimeout = 90 * time.Second

func (inst *Instance) connect(ctx context.Context) error {
	timeout := inst.rt.BootTimeout
	if timeout == 0 {
		timeout = DefaultBootTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	go func() {
		select {
		case <-inst.VM.Wait():
			cancel()
		case <-ctx.Done():
		}
	}()
	var err error
	inst.Agent, err = guest.Dial(ctx, inst.VM.DialAgent)
	if err == nil {
		return nil
	}
	if errors.Is(err, errdefs.ErrProtocol) {
		return err
	}
	select {
	case <-inst.VM.Wait():
		return errdefs.New(errdefs.ErrUnavailable, "the VM exited during boot%s", inst.consoleTail())
	default:
	}
	if ctx.Err() != nil {
		return errdefs.New(errdefs.ErrUnavailable, "the guest agent did not answer within %s%s", timeout, inst.consoleTail())
	}
	return fmt.Errorf("connecting to the guest agent: %w%s", err, inst.consoleTail())
}

// consoleTailBytes is how much of the guest console a boot error shows.
const consoleTailBytes = 3000

// consoleTail is the end of the guest console, for errors: a VM that fails must not fail
// without its logs.
func (inst *Instance) consoleTail() string {
	if inst.VM == nil {
		return ""
	}
	// Only the end is read: a guest may have written megabytes.
	s := strings.TrimSpace(string(vmm.ConsoleTail(inst.VM.ConsoleLog(), consoleTailBytes)))
	if s == "" {
		return ""
	}
	return "\n--- guest console ---\n" + s
}

// Shutdown powers the guest off cleanly (disks synced and unmounted), then removes
// everything. It falls back to Stop and Destroy when the guest does not cooperate.
func (inst *Instance) Shutdown(ctx context.Context, grace time.Duration) error {
	if inst.VM != nil && inst.Agent != nil {
		pctx, cancel := context.WithTimeout(ctx, grace)
		if inst.Agent.PowerOff(pctx) == nil {
			select {
			case <-inst.VM.Wait():
			case <-pctx.Done():
			}
		}
		cancel()
	}
	if inst.VM != nil {
		inst.VM.Stop(ctx, grace)
	}
	return inst.Destroy(ctx)
}

// Destroy kills the VM at once and removes everything it had.
func (inst *Instance) Destroy(ctx context.Context) error {
	var errs []error
	if inst.Agent != nil {
		inst.Agent.Close()
	}
	if inst.VM != nil {
		if err := inst.VM.Destroy(ctx); err != nil {
			errs = append(errs, err)
		}
	} else {
		// Created but never handed back: make sure no VMM of this VM survives.
		killByDir(inst.Dir)
	}
	for _, l := range inst.leases {
		l.Release()
	}
	cgErr := removeCgroup(inst.Config.Confine.Cgroup)
	if cgErr != nil {
		errs = append(errs, cgErr)
	}
	if err := os.RemoveAll(inst.Dir); err != nil {
		errs = append(errs, err)
	}
	// A cgroup that is still there may hold the VMM, running as its user: the claim
	// stays until a sweep finds no process of that user.
	if cgErr == nil {
		releaseUser(inst.rt.DataDir, inst.Config.Confine.UID, inst.ID)
	}
	return errors.Join(errs...)
}
