// Package firecracker is the vmm.Driver for Firecracker, written against its documented
// HTTP API over a Unix socket (src/firecracker/swagger/firecracker.yaml) and its vsock
// convention (docs/vsock.md): the host connects to the vsock Unix socket and sends
// "CONNECT <port>\n", and Firecracker answers "OK <host port>\n".
//
// Firecracker needs KVM and a guest kernel that finds virtio-mmio devices on its command
// line (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y): kiln's own kernel (internal/assets) has
// it, Debian's lacks it. On hosts without KVM, use the qemu driver. Tests run this
// driver against fctest's API server, which enforces the same API.
package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/vmm"
)

// DefaultBinary is the Firecracker executable kiln runs.
const DefaultBinary = "firecracker"

// GuestCID is the vsock context ID of every guest; each VM has its own vsock device and
// Unix socket, so they need not differ.
const GuestCID = 3

// Driver runs VMs under Firecracker.
type Driver struct {
	// Binary is the firecracker executable; empty means DefaultBinary on PATH.
	Binary string
	// Jailer, if set, runs Firecracker under its jailer.
	Jailer *Jailer
	// ConsoleLogger, if set, is a command (its path and first arguments) that reads the
	// guest console on its stdin and keeps it in the file named by its last argument,
	// capped (vmm.CaptureConsole; `kiln console-log`). It runs in a session of its own
	// and the VM's cgroup, so that it outlives a restart of kiln as Firecracker does:
	// Firecracker exits when its console pipe has no reader. Without it the console goes
	// to a file, uncapped.
	ConsoleLogger []string
}

var _ vmm.Driver = (*Driver)(nil)

func (d *Driver) Name() string { return "firecracker" }

// Capabilities: Firecracker pauses, resumes and snapshots through its API.
func (d *Driver) Capabilities() vmm.Capabilities { return vmm.Capabilities{Snapshot: true} }

func (d *Driver) binary() (string, error) {
	b := d.Binary
	if b == "" {
		b = DefaultBinary
	}
	p, err := exec.LookPath(b)
	if err != nil {
		return "", errdefs.New(errdefs.ErrMissingDependency,
			"the firecracker binary (%s) is not on this host: install firecracker and jailer from Firecracker's release onto PATH (or name them with KILN_FIRECRACKER and KILN_JAILER), or use --vmm qemu", b)
	}
	return p, nil
}

// Available says why this driver cannot start a VM on this host, or nil: its binary, and
// its jailer when it runs under one. KVM is the caller's to check (vmrun.ResolveAccel).
func (d *Driver) Available() error {
	if _, err := d.binary(); err != nil {
		return err
	}
	if d.Jailer != nil {
		if _, err := d.Jailer.binary(); err != nil {
			return err
		}
	}
	return nil
}

var _ vmm.Releaser = (*Driver)(nil)

// Release releases the jail of VM id, if it has one: the files and TAP devices lent to
// its user go back to root and the jail goes. The reaper calls it for a VM whose handle
// was never recorded.
func (d *Driver) Release(id string) error {
	if d.Jailer == nil {
		return nil
	}
	bin := d.Binary
	if p, err := d.binary(); err == nil {
		bin = p
	} else if bin == "" {
		bin = DefaultBinary
	}
	jl := d.Jailer.jail(bin, id)
	if _, err := os.Lstat(jl.dir); err != nil {
		return nil
	}
	return jl.release()
}

// files a VM keeps in its directory.
const (
	apiSock    = "firecracker.sock"
	vsockSock  = "vsock.sock"
	consoleLog = "console.log"
	vmmLog     = "vmm.log"
)

// Cmdline is the kernel command line Firecracker guests get: its serial console, the
// i8042 reset that ends the VMM on guest reboot, and no PCI.
func Cmdline(cfg vmm.Config) string {
	s := vmm.BaseCmdline + " reboot=k i8042.noaux i8042.nomux i8042.dumbkbd"
	if cfg.Cmdline != "" {
		s += " " + cfg.Cmdline
	}
	return s
}

type vm struct {
	*vmm.Process
	h     vmm.Handle
	api   *client
	vsock string // host path of the vsock Unix socket
	jail  *jail  // nil unless jailed; released by Destroy
	// base is the memory file this VM was restored from, moved out of the snapshot
	// directory; the next snapshot is a Diff merged onto it. "" for a booted VM.
	base string
}

// baseMemory is where a restored VM's memory file waits for the next (Diff) snapshot.
const baseMemory = "memory.base"

var _ vmm.VM = (*vm)(nil)
var _ vmm.Snapshotter = (*vm)(nil)
var _ vmm.Restorer = (*Driver)(nil)

// start launches a Firecracker process for cfg and waits for its API.
func (d *Driver) start(ctx context.Context, cfg vmm.Config) (*vm, error) {
	bin, err := d.binary()
	if err != nil {
		return nil, err
	}
	// Sockets of an earlier Firecracker in this directory (a restore) must not be in the way.
	vmm.RemoveFiles(cfg.Dir, apiSock, vsockSock)
	console, err := d.console(filepath.Join(cfg.Dir, consoleLog), cfg.Confine.Cgroup)
	if err != nil {
		return nil, err
	}
	defer console.Close()
	logf, err := os.Create(filepath.Join(cfg.Dir, vmmLog))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	sock, vsock := filepath.Join(cfg.Dir, apiSock), filepath.Join(cfg.Dir, vsockSock)
	var cmd *exec.Cmd
	var jl *jail
	if d.Jailer != nil {
		if cmd, jl, err = d.Jailer.command(bin, cfg); err != nil {
			return nil, err
		}
		sock, vsock = jl.host(jailedAPISock), jl.host(vsockSock)
	} else {
		cmd = exec.Command(bin, "--api-sock", sock, "--id", cfg.ID)
	}
	// Firecracker writes the guest's serial console to its stdout.
	cmd.Stdout, cmd.Stderr = console, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// Firecracker opens the files the API names itself, so only the jailer, which links
	// them into a chroot it owns, can run it as the VM's user; either way it starts in the
	// VM's cgroup (the jailer execs Firecracker in place).
	confine := vmm.Confine{Cgroup: cfg.Confine.Cgroup}
	proc, err := vmm.StartProcess(cmd, confine)
	if err != nil {
		return nil, fmt.Errorf("starting firecracker: %w", err)
	}
	v := &vm{
		Process: proc,
		h: vmm.Handle{Driver: d.Name(), ID: cfg.ID, Dir: cfg.Dir, PID: proc.PID,
			PIDStart: proc.Start, Accel: vmm.AccelKVM},
		api:   newClient(sock, proc.PID),
		vsock: vsock,
		jail:  jl,
	}
	if err := v.waitAPI(ctx, 10*time.Second); err != nil {
		v.Kill(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("firecracker did not come up: %w%s", err, vmm.LogTail(filepath.Join(cfg.Dir, vmmLog)))
	}
	return v, nil
}

// console returns what Firecracker's stdout (the guest's serial console) is written to:
// a pipe to the console logger, or the log file itself.
func (d *Driver) console(path, cgroup string) (*os.File, error) {
	if len(d.ConsoleLogger) == 0 {
		return os.Create(path)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	lg := exec.Command(d.ConsoleLogger[0], append(d.ConsoleLogger[1:], path)...)
	lg.Stdin = r
	lg.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// In the VM's cgroup, with its VMM: it is counted there, and outlives a service
	// manager's stop of kiln's own group as the VMM does. It ends when Firecracker, the
	// pipe's writer, has; vmm.StartProcess reaps it.
	if _, err := vmm.StartProcess(lg, vmm.Confine{Cgroup: cgroup}); err != nil {
		w.Close()
		return nil, fmt.Errorf("starting the console logger: %w", err)
	}
	return w, nil
}

func (v *vm) waitAPI(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		var info InstanceInfo
		err := v.api.do(ctx, "GET", "/", nil, &info)
		if err == nil {
			return nil
		}
		if v.IsExited() {
			return errors.New("process exited")
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Create starts Firecracker and configures the VM; the guest starts with Start.
func (d *Driver) Create(ctx context.Context, cfg vmm.Config) (vmm.VM, error) {
	if _, err := d.binary(); err != nil {
		return nil, err
	}
	if err := vmm.Validate(cfg); err != nil {
		return nil, err
	}
	if cfg.Accel == vmm.AccelTCG {
		return nil, errdefs.Invalid("firecracker needs KVM; this host runs guests under software emulation: use --vmm qemu")
	}
	v, err := d.start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	// Jailed, Firecracker sees the files linked into its jail, at the jail's root.
	path := func(p string) string { return p }
	vsockPath := filepath.Join(cfg.Dir, vsockSock)
	if v.jail != nil {
		path, vsockPath = inside, "/"+vsockSock
	}
	smt, track := false, true
	steps := []struct {
		method, path string
		body         any
	}{
		// Dirty pages are tracked so that a resumed machine's next suspend writes only
		// what changed (a Diff snapshot).
		{"PUT", "/machine-config", MachineConfig{VCPUCount: cfg.CPUs, MemSizeMib: cfg.MemoryMiB, SMT: &smt, TrackDirtyPages: &track}},
		{"PUT", "/boot-source", BootSource{KernelImagePath: path(cfg.Kernel), InitrdPath: path(cfg.Initramfs), BootArgs: Cmdline(cfg)}},
	}
	for i, disk := range cfg.Disks {
		id := fmt.Sprintf("disk%d", i)
		steps = append(steps, struct {
			method, path string
			body         any
		}{"PUT", "/drives/" + id, Drive{DriveID: id, PathOnHost: path(disk.Path), IsReadOnly: disk.ReadOnly}})
	}
	for i, n := range cfg.NICs {
		id := fmt.Sprintf("eth%d", i)
		steps = append(steps, struct {
			method, path string
			body         any
		}{"PUT", "/network-interfaces/" + id, NetworkInterface{IfaceID: id, HostDevName: n.HostDev, GuestMAC: n.MAC}})
	}
	steps = append(steps, struct {
		method, path string
		body         any
	}{"PUT", "/vsock", Vsock{GuestCID: GuestCID, UDSPath: vsockPath}})
	for _, s := range steps {
		if err := v.api.do(ctx, s.method, s.path, s.body, nil); err != nil {
			v.Destroy(context.WithoutCancel(ctx))
			return nil, err
		}
	}
	return v, nil
}

// Recover re-attaches to a Firecracker started by an earlier kiln process.
func (d *Driver) Recover(ctx context.Context, h vmm.Handle) (vmm.VM, error) {
	sock, vs := filepath.Join(h.Dir, apiSock), filepath.Join(h.Dir, vsockSock)
	var jl *jail
	if d.Jailer != nil {
		bin, err := d.binary()
		if err != nil {
			return nil, err
		}
		jl = d.Jailer.jail(bin, h.ID)
		sock, vs = jl.host(jailedAPISock), jl.host(vsockSock)
	}
	v := &vm{Process: vmm.AttachProcess(h.PID, h.PIDStart), h: h, api: newClient(sock, h.PID), vsock: vs, jail: jl}
	if _, err := os.Stat(filepath.Join(h.Dir, baseMemory)); err == nil {
		v.base = filepath.Join(h.Dir, baseMemory) // restored from a snapshot: the next is a Diff
	}
	if !vmm.Alive(h.PID, h.PIDStart) {
		return v, nil
	}
	if err := v.waitAPI(ctx, 5*time.Second); err != nil {
		return v, fmt.Errorf("re-attaching to firecracker pid %d: %w", h.PID, err)
	}
	return v, nil
}

func (v *vm) Handle() vmm.Handle    { return v.h }
func (v *vm) Wait() <-chan struct{} { return v.Exited() }
func (v *vm) ConsoleLog() string    { return filepath.Join(v.h.Dir, consoleLog) }
func (v *vm) Detach() error         { return nil } // every API call is its own connection

func (v *vm) action(ctx context.Context, a string) error {
	if v.IsExited() {
		return errdefs.New(errdefs.ErrConflict, "vm %s is not running", v.h.ID)
	}
	return v.api.do(ctx, "PUT", "/actions", Action{ActionType: a}, nil)
}

func (v *vm) Start(ctx context.Context) error { return v.action(ctx, "InstanceStart") }

func (v *vm) Pause(ctx context.Context) error {
	return v.api.do(ctx, "PATCH", "/vm", VMState{State: "Paused"}, nil)
}

func (v *vm) Resume(ctx context.Context) error {
	return v.api.do(ctx, "PATCH", "/vm", VMState{State: "Resumed"}, nil)
}

// Snapshot pauses the VM and writes dir/vmstate and dir/memory. A VM booted from scratch
// gets a Full snapshot. A VM restored from one gets a Diff: only the pages written
// since the restore, merged onto the memory file it was restored from, so a machine
// that suspends again and again writes what it changed, not all its RAM.
func (v *vm) Snapshot(ctx context.Context, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := v.Pause(ctx); err != nil {
		return err
	}
	// Jailed, Firecracker writes into its jail; the files then move to dir, read through
	// the jail's snapshot directory opened once (jd), as its user may change any path.
	api := dir
	var jd *os.File
	if v.jail != nil {
		api = snapshotDir
		var err error
		if jd, err = v.jail.openDir(snapshotDir); err != nil {
			return err
		}
		defer jd.Close()
	}
	vmstate := filepath.Join(api, "vmstate")
	mem := filepath.Join(dir, "memory")
	if v.base != "" {
		diff := filepath.Join(api, "memory.diff")
		err := v.api.do(ctx, "PUT", "/snapshot/create", SnapshotCreate{
			SnapshotType: "Diff", SnapshotPath: vmstate, MemFilePath: diff,
		}, nil)
		if err == nil {
			err = mergeDiffIn(v.base, jd, diff)
		}
		removeIn(jd, diff)
		if err == nil {
			err = atomicfile.Rename(v.base, mem)
		}
		if err == nil {
			// The base was the VM user's while the VM ran from it.
			err = os.Lchown(mem, 0, 0)
		}
		if err == nil {
			v.base = ""
			return moveOut(jd, "vmstate", filepath.Join(dir, "vmstate"))
		}
		// The base is of no use now: write everything.
		os.Remove(v.base)
		v.base = ""
	}
	err := v.api.do(ctx, "PUT", "/snapshot/create", SnapshotCreate{
		SnapshotType: "Full",
		SnapshotPath: vmstate,
		MemFilePath:  filepath.Join(api, "memory"),
	}, nil)
	if err != nil {
		return err
	}
	if err := moveOut(jd, "vmstate", filepath.Join(dir, "vmstate")); err != nil {
		return err
	}
	return moveOut(jd, "memory", mem)
}

// moveOut moves the file name, which Firecracker wrote in the jail directory jd, to where
// kiln keeps it (to), owned by root; with jd nil (no jail) Firecracker wrote it there
// itself. The jail belongs to the VM's user, who may have put anything there: only a
// regular file of one link is taken, opened without following a link, and what arrives
// at to must be that same file, else it is removed.
func moveOut(jd *os.File, name, to string) error {
	if jd == nil {
		return nil
	}
	f, err := openJailed(jd, name)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if err := f.Chown(0, 0); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("flushing %s: %w", f.Name(), err)
	}
	if err := unix.Renameat(int(jd.Fd()), name, unix.AT_FDCWD, to); err != nil {
		return fmt.Errorf("moving a snapshot out of the jail (the chroot base must be on the data dir's filesystem): %w", err)
	}
	if got, err := os.Lstat(to); err != nil || !os.SameFile(fi, got) {
		os.Remove(to)
		return errdefs.New(errdefs.ErrInvalid, "%s changed while it was moved out of the jail: the snapshot is refused", f.Name())
	}
	return atomicfile.SyncDir(filepath.Dir(to))
}

// openDir opens a directory of the jail without following a link at any step below
// the jail's root, which the jailer made and its user cannot replace.
func (jl *jail) openDir(inside string) (*os.File, error) {
	fd, err := unix.Open(jl.root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening the jail %s: %w", jl.root, err)
	}
	for _, part := range strings.Split(strings.Trim(filepath.Clean(inside), "/"), "/") {
		next, err := unix.Openat(fd, part, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		if err != nil {
			return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "opening %s in the jail %s (a link or not a directory is refused)", inside, jl.root)
		}
		fd = next
	}
	return os.NewFile(uintptr(fd), jl.host(inside)), nil
}

// openJailed opens the file name in the jail directory jd for reading, refusing what
// the VM's user could have put there to make kiln, as root, read or hold something
// else: a symbolic link, a device or FIFO, a hard link to another file.
func openJailed(jd *os.File, name string) (*os.File, error) {
	path := filepath.Join(jd.Name(), name)
	fd, err := unix.Openat(int(jd.Fd()), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "opening %s in the jail", path)
	}
	f := os.NewFile(uintptr(fd), path)
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	st, _ := fi.Sys().(*syscall.Stat_t)
	if !fi.Mode().IsRegular() || st == nil || st.Nlink != 1 {
		f.Close()
		return nil, errdefs.New(errdefs.ErrInvalid, "%s in the jail is not a file of its own (%v): refused", path, fi.Mode())
	}
	return f, nil
}

// mergeDiffIn merges the Diff memory file diff: read through the jail directory jd, or
// at its path without a jail.
func mergeDiffIn(base string, jd *os.File, diff string) error {
	if jd == nil {
		return MergeDiff(base, diff)
	}
	d, err := openJailed(jd, filepath.Base(diff))
	if err != nil {
		return err
	}
	defer d.Close()
	return mergeDiff(base, d)
}

// removeIn removes a file Firecracker wrote: in the jail directory jd, or at its path.
func removeIn(jd *os.File, path string) {
	if jd == nil {
		os.Remove(path)
		return
	}
	unix.Unlinkat(int(jd.Fd()), filepath.Base(path), 0)
}

// MergeDiff writes the data of a Diff snapshot's memory file (a sparse file of the
// guest's size holding only dirty pages) over the base memory file at the same offsets.
func MergeDiff(base, diff string) error {
	d, err := os.OpenFile(diff, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer d.Close()
	if fi, err := d.Stat(); err != nil || !fi.Mode().IsRegular() {
		return errdefs.New(errdefs.ErrInvalid, "%s is not a regular file: refused", diff)
	}
	return mergeDiff(base, d)
}

func mergeDiff(base string, d *os.File) error {
	diff := d.Name()
	b, err := os.OpenFile(base, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	st, err := d.Stat()
	if err != nil {
		b.Close()
		return err
	}
	for off := int64(0); off < st.Size(); {
		data, err := unix.Seek(int(d.Fd()), off, unix.SEEK_DATA)
		if err == unix.ENXIO {
			break // only holes from here on
		}
		if err != nil {
			b.Close()
			return fmt.Errorf("reading %s: %w", diff, err)
		}
		hole, err := unix.Seek(int(d.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			b.Close()
			return fmt.Errorf("reading %s: %w", diff, err)
		}
		if _, err := io.Copy(io.NewOffsetWriter(b, data), io.NewSectionReader(d, data, hole-data)); err != nil {
			b.Close()
			return fmt.Errorf("merging %s into %s: %w", diff, base, err)
		}
		off = hole
	}
	if err := b.Sync(); err != nil {
		b.Close()
		return err
	}
	return b.Close()
}

// Restore starts a new Firecracker from a snapshot written by Snapshot and resumes it.
// cfg must name the snapshotted VM's directory: the vsock socket path comes from the
// snapshot. The memory file moves to the VM's directory as the base of the next Diff
// (Firecracker maps it; the move does not disturb the mapping).
func (d *Driver) Restore(ctx context.Context, cfg vmm.Config, dir string) (vmm.VM, error) {
	v, err := d.start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	api := dir
	if v.jail != nil {
		// Jailed, the snapshot is linked into the jail for the VM's user to read.
		api = snapshotDir
		uid, gid, _ := d.Jailer.user(cfg)
		for _, f := range []string{"vmstate", "memory"} {
			if err := linkIn(filepath.Join(dir, f), v.jail.host(filepath.Join(api, f)), true, uid, gid); err != nil {
				v.Destroy(context.WithoutCancel(ctx))
				return nil, err
			}
		}
	}
	track := true
	err = v.api.do(ctx, "PUT", "/snapshot/load", SnapshotLoad{
		SnapshotPath:    filepath.Join(api, "vmstate"),
		MemBackend:      &MemBackend{BackendType: "File", BackendPath: filepath.Join(api, "memory")},
		TrackDirtyPages: &track,
		ResumeVM:        true,
	}, nil)
	if err != nil {
		v.Destroy(context.WithoutCancel(ctx))
		return nil, err
	}
	base := filepath.Join(cfg.Dir, baseMemory)
	if os.Rename(filepath.Join(dir, "memory"), base) == nil {
		v.base = base
	}
	return v, nil
}

// Stop sends Ctrl-Alt-Del (kiln-init powers off on it) and kills Firecracker if the
// guest is not gone within grace.
func (v *vm) Stop(ctx context.Context, grace time.Duration) error {
	return v.Process.Stop(ctx, grace, func(ctx context.Context) error { return v.action(ctx, "SendCtrlAltDel") })
}

// Destroy kills Firecracker and removes the driver's files from the VM's directory.
func (v *vm) Destroy(ctx context.Context) error {
	err := v.Kill(ctx)
	if rerr := vmm.RemoveFiles(v.h.Dir, apiSock, vsockSock, consoleLog, consoleLog+".1", vmmLog, baseMemory); err == nil {
		err = rerr
	}
	if v.jail != nil {
		if rerr := v.jail.release(); rerr != nil && err == nil {
			err = rerr
		}
	}
	return err
}

func (v *vm) Inspect(ctx context.Context) (vmm.Info, error) {
	info := vmm.Info{PID: v.h.PID, Accel: v.h.Accel, State: vmm.StateExited}
	if v.IsExited() {
		return info, nil
	}
	var ii InstanceInfo
	if err := v.api.do(ctx, "GET", "/", nil, &ii); err != nil {
		if v.IsExited() {
			return info, nil
		}
		return info, err
	}
	switch ii.State {
	case "Not started":
		info.State = vmm.StateCreated
	case "Running":
		info.State = vmm.StateRunning
	case "Paused":
		info.State = vmm.StatePaused
	default:
		info.State = vmm.State(ii.State)
	}
	return info, nil
}

// DialAgent connects to the guest agent through Firecracker's vsock Unix socket.
func (v *vm) DialAgent(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", v.vsock)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "connecting to the vsock of vm %s", v.h.ID)
	}
	if err := peerIs(c, v.h.PID); err != nil {
		c.Close()
		return nil, err
	}
	if err := vsockConnect(ctx, c, guest.VsockPort); err != nil {
		c.Close()
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "vsock handshake with vm %s", v.h.ID)
	}
	return c, nil
}

// vsockConnect performs Firecracker's host-initiated vsock handshake. It reads the
// answer a byte at a time so that nothing after the newline is consumed.
func vsockConnect(ctx context.Context, c net.Conn, port uint32) error {
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		return err
	}
	var line []byte
	b := make([]byte, 1)
	for len(line) < 64 {
		if _, err := c.Read(b); err != nil {
			return fmt.Errorf("reading vsock answer: %w", err)
		}
		if b[0] == '\n' {
			s := string(line)
			if !strings.HasPrefix(s, "OK ") {
				return fmt.Errorf("vsock answered %q, want OK", s)
			}
			return nil
		}
		line = append(line, b[0])
	}
	return errors.New("vsock answer too long")
}
