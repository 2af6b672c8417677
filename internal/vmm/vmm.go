// Package vmm defines what kiln needs from a virtual machine monitor and the adapters
// (qemu, firecracker) implement. The core owns these interfaces; every adapter runs the
// same conformance suite in package vmmtest.
//
// Lifecycle of a VM:
//
//	Create   the VMM process is started and configured but the guest does not run yet;
//	         every file the VM will use lives in Config.Dir, which the caller created and
//	         recorded beforehand.
//	Start    the guest boots.
//	Stop     the guest is asked to power off; after the grace period it is killed.
//	Kill     the VMM process is killed at once.
//	Wait     a channel closed when the VMM process has exited, whatever the cause.
//	Destroy  kills if needed and removes everything the driver made in Config.Dir.
//	Detach   lets go of a running VM without stopping it.
//	Recover  re-attaches to a VM from its persisted Handle, e.g. after kiln restarted.
//
// Drivers that declare Capabilities.Snapshot also implement Snapshotter.
package vmm

import (
	"context"
	"net"
	"time"
)

// Accel is how guest code runs.
type Accel string

const (
	AccelKVM Accel = "kvm"
	AccelTCG Accel = "tcg" // QEMU's software emulation
)

// Disk is a block device given to the guest.
type Disk struct {
	Path     string
	ReadOnly bool
}

// NIC is a network interface backed by a host TAP device the caller created.
type NIC struct {
	HostDev string // TAP device name on the host
	MAC     string // guest MAC address; empty lets the VMM choose
}

// Config describes a VM to create.
type Config struct {
	ID        string
	Dir       string // the VM's own directory: sockets, logs, snapshots
	CPUs      int
	MemoryMiB int
	Kernel    string // ELF vmlinux
	Initramfs string
	// Cmdline holds kiln's own kernel arguments; the driver adds its console, reboot
	// and timing flags.
	Cmdline string
	// NoACPI says the kernel has no ACPI (kiln's own): the VMM offers none and names its
	// virtio-mmio devices on the kernel command line instead.
	NoACPI bool `json:",omitempty"`
	Disks  []Disk
	NICs   []NIC
	// Accel is the accelerator to use; empty lets the driver choose (KVM if usable).
	Accel Accel
	// Confine is the user and cgroup the VMM runs in.
	Confine Confine
}

// Confine is how a VMM process is held in. The caller (vmrun) picks the user, makes the
// cgroup beforehand and removes it afterwards; the driver only starts its process with
// them, and adds its own sandbox (QEMU's seccomp filter, Firecracker's jailer). The zero
// value runs the VMM as the caller, in the caller's cgroup.
type Confine struct {
	// UID and GID are the VMM's user and group; 0 keeps the caller's.
	UID uint32 `json:"uid,omitempty"`
	GID uint32 `json:"gid,omitempty"`
	// Groups are supplementary groups: the group owning /dev/kvm, say.
	Groups []uint32 `json:"groups,omitempty"`
	// Cgroup is the group, relative to the hierarchy's root, the VMM starts in
	// ("kiln/<vm id>"); "" is none.
	Cgroup string `json:"cgroup,omitempty"`
}

// Capabilities say what a driver can do beyond the basic lifecycle.
type Capabilities struct {
	Snapshot bool // Pause, Resume, Snapshot, Restore
}

// State is a VM's observed state.
type State string

const (
	StateCreated State = "created" // VMM up, guest not started
	StateRunning State = "running"
	StatePaused  State = "paused"
	StateExited  State = "exited" // VMM process gone
)

// Info is what Inspect observes.
type Info struct {
	State State
	PID   int
	Accel Accel
}

// Handle is the persisted identity of a VM: everything Recover needs.
type Handle struct {
	Driver string `json:"driver"`
	ID     string `json:"id"`
	Dir    string `json:"dir"`
	PID    int    `json:"pid"`
	// PIDStart is the process start time (clock ticks since boot, /proc/PID/stat field
	// 22); with PID it names the process even after the PID is reused.
	PIDStart uint64 `json:"pid_start"`
	Accel    Accel  `json:"accel"`
}

// Driver creates and recovers VMs.
type Driver interface {
	Name() string
	Capabilities() Capabilities
	Create(ctx context.Context, cfg Config) (VM, error)
	Recover(ctx context.Context, h Handle) (VM, error)
}

// VM is one VMM process and its guest.
type VM interface {
	Handle() Handle
	Start(ctx context.Context) error
	Stop(ctx context.Context, grace time.Duration) error
	Kill(ctx context.Context) error
	Destroy(ctx context.Context) error
	Wait() <-chan struct{}
	Inspect(ctx context.Context) (Info, error)
	// DialAgent connects to the guest agent's transport.
	DialAgent(ctx context.Context) (net.Conn, error)
	// ConsoleLog is the path of the guest's serial console output.
	ConsoleLog() string
	// Detach drops this process's connections to the VMM and leaves the VM running, for
	// a kiln that hands its VMs to its successor (which calls Recover).
	Detach() error
}

// Releaser is implemented by drivers that keep host state for a VM outside its
// directory (Firecracker's jail). The reaper calls it for a VM left by a kiln that died
// before recording the VM's handle, once the VM's processes are gone.
type Releaser interface {
	Release(id string) error
}

// Snapshotter is implemented by VMs whose driver declares Capabilities.Snapshot.
type Snapshotter interface {
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
	// Snapshot pauses the VM and writes its state and memory under dir; it stays paused.
	Snapshot(ctx context.Context, dir string) error
}

// Restorer is implemented by drivers that declare Capabilities.Snapshot: it starts a new
// VMM from a Snapshot's directory, with the same Config (same directory, devices and
// files) as the VM the snapshot was taken of, and returns it running.
type Restorer interface {
	Restore(ctx context.Context, cfg Config, dir string) (VM, error)
}

// BaseCmdline are kernel arguments every kiln guest gets. The tsc flags keep a kernel
// under software emulation from hanging while it calibrates the TSC (about one boot in
// three without them); panic=-1 turns a guest panic into a VMM exit rather than a hang.
const BaseCmdline = "console=ttyS0 pci=off quiet loglevel=4 panic=-1 tsc_early_khz=2000000 tsc=reliable no_timer_check rdinit=/init"
