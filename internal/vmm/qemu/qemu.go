// Package qemu is the vmm.Driver for QEMU's microvm machine type: the driver that runs
// where Firecracker cannot (no KVM, or no firecracker binary). It boots the same ELF
// kernel and initramfs, gives the guest virtio-mmio disks and a virtio-serial port for
// the agent, and controls QEMU over QMP.
package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/vmm"
)

// DefaultBinary is the QEMU system emulator kiln runs.
const DefaultBinary = "qemu-system-x86_64"

// Driver runs VMs under QEMU.
type Driver struct {
	// Binary is the QEMU executable; empty means DefaultBinary on PATH.
	Binary string
	// KillWithParent makes QEMU die with the process that started it. kiln leaves it off
	// so VMs outlive a kiln restart; a wrapper such as the Firecracker test server turns
	// it on so that killing the wrapper kills its VM.
	KillWithParent bool
}

var _ vmm.Driver = (*Driver)(nil)

func (d *Driver) Name() string { return "qemu" }

// Capabilities: QEMU pauses, resumes, and saves and restores a VM through migration to a
// file.
func (d *Driver) Capabilities() vmm.Capabilities { return vmm.Capabilities{Snapshot: true} }

// Binary resolves the QEMU executable or explains how to install it.
func (d *Driver) binary() (string, error) {
	b := d.Binary
	if b == "" {
		b = DefaultBinary
	}
	p, err := exec.LookPath(b)
	if err != nil {
		return "", errdefs.Missing("QEMU ("+b+")", "qemu-system-x86")
	}
	return p, nil
}

// files a VM keeps in its directory.
const (
	qmpSock    = "qmp.sock"
	agentSock  = "agent.sock"
	consoleLog = "console.log"
	// consoleSock carries the guest console to kiln, which keeps it in consoleLog, capped.
	consoleSock = "console.sock"
	vmmLog      = "vmm.log"
)

// Sandbox is QEMU's seccomp filter: no obsolete system calls, no setuid or other privilege
// changes, no new processes (so no exec: migration, which is why snapshots go through a
// descriptor), no scheduler or resource changes. QEMU enters it before it runs the guest.
const Sandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// Command is QEMU's command line for cfg and the open files it names by descriptor
// number. QEMU opens no path of the VM's itself: kiln, as root, opens the monitor and
// agent sockets, the console, kernel, initramfs, disks and TAP devices, and hands them
// over. So the unprivileged VMM needs no way into DATA_DIR (0700), cannot reach root
// filesystems that other VMs share except through the descriptors it was given, and
// owns no file it could leave behind. The caller closes the files once QEMU has started.
func Command(cfg vmm.Config) (args []string, files []*os.File, err error) {
	c := &command{}
	defer func() {
		if err != nil {
			c.close()
		}
	}()
	accel, cpu := "tcg,thread=multi,tb-size=64", "max"
	if cfg.Accel == vmm.AccelKVM {
		accel, cpu = "kvm", "host"
	}
	cmdline := vmm.BaseCmdline + " reboot=t"
	if cfg.Cmdline != "" {
		cmdline += " " + cfg.Cmdline
	}
	qmp, err := listen(filepath.Join(cfg.Dir, qmpSock))
	if err != nil {
		return nil, nil, err
	}
	qmpFD := c.fd(qmp)
	agent, err := listen(filepath.Join(cfg.Dir, agentSock))
	if err != nil {
		return nil, nil, err
	}
	agentFD := c.fd(agent)
	// The console is a socket kiln reads into a capped log (vmm.CaptureConsole), not a
	// file QEMU writes: that would grow as long as the guest writes.
	console, err := listen(filepath.Join(cfg.Dir, consoleSock))
	if err != nil {
		return nil, nil, err
	}
	consoleFD := c.fd(console)
	kernel, err := os.Open(cfg.Kernel)
	if err != nil {
		return nil, nil, err
	}
	// A kernel without ACPI finds the virtio-mmio devices on its command line, which
	// microvm writes only when it offers no ACPI tables.
	machine := "microvm,x-option-roms=off,isa-serial=on,rtc=on"
	if cfg.NoACPI {
		machine += ",acpi=off"
	}
	c.args = append(c.args,
		// The VM's directory names the process, for the reaper and for people.
		"-name", strings.ReplaceAll(cfg.Dir, ",", ",,")+"/",
		"-sandbox", Sandbox,
		"-M", machine,
		"-accel", accel, "-cpu", cpu,
		"-smp", fmt.Sprint(cfg.CPUs), "-m", fmt.Sprintf("%dM", cfg.MemoryMiB),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-S",
		// QEMU reads the kernel and initramfs by path only; /proc/self/fd/N reaches the
		// descriptor it was given without walking DATA_DIR.
		"-kernel", fmt.Sprintf("/proc/self/fd/%d", c.fd(kernel)), "-append", cmdline,
		"-chardev", fmt.Sprintf("socket,id=con,fd=%d,server=on,wait=off", consoleFD),
		"-serial", "chardev:con",
		"-chardev", fmt.Sprintf("socket,id=qmp,fd=%d,server=on,wait=off", qmpFD),
		"-mon", "chardev=qmp,mode=control",
		"-device", "virtio-serial-device",
		"-chardev", fmt.Sprintf("socket,id=agent,fd=%d,server=on,wait=off", agentFD),
		"-device", "virtserialport,chardev=agent,name="+guest.PortName,
		// A keyboard controller for Ctrl-Alt-Del: how Stop reaches a kernel without ACPI
		// (kiln's own), as Firecracker's SendCtrlAltDel does.
		"-device", "i8042",
	)
	if cfg.Initramfs != "" {
		f, err := os.Open(cfg.Initramfs)
		if err != nil {
			return nil, nil, err
		}
		c.args = append(c.args, "-initrd", fmt.Sprintf("/proc/self/fd/%d", c.fd(f)))
	}
	for i, d := range cfg.Disks {
		// A read-write disk's set also holds a read-only descriptor: QEMU may reopen an
		// image read-only (around a migration) and takes from the set the descriptor
		// whose access mode matches.
		ro, err := os.Open(d.Path)
		if err != nil {
			return nil, nil, fmt.Errorf("disk %s: %w", d.Path, err)
		}
		set := c.fdset(ro)
		opt := fmt.Sprintf("id=disk%d,file=/dev/fdset/%d,format=raw,if=none", i, set)
		if d.ReadOnly {
			opt += ",readonly=on"
		} else {
			rw, err := os.OpenFile(d.Path, os.O_RDWR, 0)
			if err != nil {
				return nil, nil, fmt.Errorf("disk %s: %w", d.Path, err)
			}
			c.addToSet(rw, set)
		}
		c.args = append(c.args, "-drive", opt, "-device", fmt.Sprintf("virtio-blk-device,drive=disk%d", i))
	}
	for i, n := range cfg.NICs {
		tap, err := openTAP(n.HostDev)
		if err != nil {
			return nil, nil, err
		}
		dev := fmt.Sprintf("virtio-net-device,netdev=net%d", i)
		if n.MAC != "" {
			dev += ",mac=" + n.MAC
		}
		c.args = append(c.args, "-netdev", fmt.Sprintf("tap,id=net%d,fd=%d", i, c.fd(tap)), "-device", dev)
	}
	return c.args, c.files, nil
}

// command collects arguments and the files they refer to.
type command struct {
	args  []string
	files []*os.File
	sets  int
}

// fd hands f to QEMU and returns its number there (extra files start at 3).
func (c *command) fd(f *os.File) int {
	c.files = append(c.files, f)
	return 2 + len(c.files)
}

// fdset puts f in a new descriptor set, for options that take /dev/fdset/N.
func (c *command) fdset(f *os.File) int {
	c.sets++
	c.addToSet(f, c.sets)
	return c.sets
}

func (c *command) addToSet(f *os.File, set int) {
	c.args = append(c.args, "-add-fd", fmt.Sprintf("fd=%d,set=%d", c.fd(f), set))
}

func (c *command) close() {
	for _, f := range c.files {
		f.Close()
	}
}

// listen makes a Unix socket at path that only root may connect to and returns its
// listening descriptor; the socket outlives this process, so a later kiln can Recover.
func listen(path string) (*os.File, error) {
	os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(false)
	defer ln.Close()
	if err := os.Chmod(path, 0o600); err != nil {
		return nil, err
	}
	return ln.File()
}

// openTAP attaches to the TAP device the caller created, with the flags QEMU itself
// would use (no packet information, virtio-net headers).
func openTAP(name string) (*os.File, error) {
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("opening /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		f.Close()
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "tap device name %q", name)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(int(f.Fd()), unix.TUNSETIFF, ifr); err != nil {
		f.Close()
		return nil, fmt.Errorf("attaching to tap device %s: %w", name, err)
	}
	return f, nil
}

type vm struct {
	*vmm.Process
	h  vmm.Handle
	mu sync.Mutex
	q  *qmp
	// con is the console connection that conDone says was read to its end.
	con     net.Conn
	conDone chan struct{}
}

var _ vmm.VM = (*vm)(nil)
var _ vmm.Snapshotter = (*vm)(nil)
var _ vmm.Restorer = (*Driver)(nil)

// Create starts QEMU paused (-S) with cfg and connects to its monitor.
func (d *Driver) Create(ctx context.Context, cfg vmm.Config) (vmm.VM, error) {
	return d.create(ctx, config{Config: cfg})
}

// config is a vmm.Config plus how this driver starts it.
type config struct {
	vmm.Config
	incoming bool // wait for a migration stream (Restore)
}

func (d *Driver) create(ctx context.Context, cfg config) (*vm, error) {
	bin, err := d.binary()
	if err != nil {
		return nil, err
	}
	if err := vmm.Validate(cfg.Config); err != nil {
		return nil, err
	}
	if cfg.Accel == "" {
		cfg.Accel = vmm.AccelTCG
	}
	logf, err := os.OpenFile(filepath.Join(cfg.Dir, vmmLog), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	args, files, err := Command(cfg.Config)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	if cfg.incoming {
		args = append(args, "-incoming", "defer")
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr, cmd.ExtraFiles = logf, logf, files
	// Own session: a terminal's Ctrl-C reaches kiln, which then stops the VM in order,
	// instead of reaching QEMU directly.
	// A network namespace of its own, empty: QEMU is handed its TAP devices and sockets
	// as descriptors, so a QEMU that a guest took over cannot open a connection to the
	// host's services, the database or the metadata address.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Cloneflags: syscall.CLONE_NEWNET}
	if d.KillWithParent {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	proc, err := vmm.StartProcess(cmd, cfg.Confine)
	if err != nil {
		return nil, fmt.Errorf("starting qemu: %w", err)
	}
	v := &vm{
		Process: proc,
		h: vmm.Handle{Driver: d.Name(), ID: cfg.ID, Dir: cfg.Dir, PID: proc.PID,
			PIDStart: proc.Start, Accel: cfg.Accel},
	}
	qctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	go func() {
		select {
		case <-proc.Exited():
			cancel()
		case <-qctx.Done():
		}
	}()
	v.q, err = dialQMP(qctx, filepath.Join(cfg.Dir, qmpSock))
	if err != nil {
		v.Kill(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("qemu did not come up: %w%s", err, vmm.LogTail(filepath.Join(cfg.Dir, vmmLog)))
	}
	// Before the guest runs (-S), so the log has its first line.
	v.captureConsole()
	return v, nil
}

// Recover re-attaches to a QEMU started by an earlier kiln process.
func (d *Driver) Recover(ctx context.Context, h vmm.Handle) (vmm.VM, error) {
	v := &vm{h: h, Process: vmm.AttachProcess(h.PID, h.PIDStart)}
	if !vmm.Alive(h.PID, h.PIDStart) {
		return v, nil
	}
	qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	q, err := dialQMP(qctx, filepath.Join(h.Dir, qmpSock))
	if err != nil {
		return v, fmt.Errorf("re-attaching to qemu pid %d: %w", h.PID, err)
	}
	v.q = q
	v.captureConsole()
	return v, nil
}

func (v *vm) Handle() vmm.Handle    { return v.h }
func (v *vm) Wait() <-chan struct{} { return v.Exited() }

// ConsoleLog is the console's log. Once QEMU has exited it returns after what QEMU wrote
// is in the log (or a second has passed), so a boot failure's error has the last lines.
func (v *vm) ConsoleLog() string {
	if v.IsExited() && v.conDone != nil {
		select {
		case <-v.conDone:
		case <-time.After(time.Second):
		}
	}
	return filepath.Join(v.h.Dir, consoleLog)
}

// captureConsole reads the guest console from QEMU's socket into the capped log until
// QEMU exits or the VM is detached. While no kiln reads it QEMU drops console output:
// a kiln that is down loses lines, never disk.
func (v *vm) captureConsole() {
	c, err := net.Dial("unix", filepath.Join(v.h.Dir, consoleSock))
	if err != nil {
		return
	}
	v.con, v.conDone = c, make(chan struct{})
	go func() {
		defer close(v.conDone)
		defer c.Close()
		vmm.CaptureConsole(c, filepath.Join(v.h.Dir, consoleLog))
	}()
}

func (v *vm) qmpRun(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	v.mu.Lock()
	q := v.q
	v.mu.Unlock()
	if q == nil || v.IsExited() {
		return nil, errdefs.New(errdefs.ErrConflict, "vm %s is not running", v.h.ID)
	}
	return q.run(ctx, cmd, args)
}

func (v *vm) Start(ctx context.Context) error {
	_, err := v.qmpRun(ctx, "cont", nil)
	return err
}

func (v *vm) Pause(ctx context.Context) error {
	_, err := v.qmpRun(ctx, "stop", nil)
	return err
}

func (v *vm) Resume(ctx context.Context) error { return v.Start(ctx) }

// stateFile is where Snapshot writes the VM's memory and device state in dir.
const stateFile = "state"

// Snapshot pauses the VM and saves its memory and device state to dir/state with QEMU's
// migration stream. The VM stays paused; the caller kills or resumes it.
func (v *vm) Snapshot(ctx context.Context, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if _, err := v.qmpRun(ctx, "stop", nil); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(dir, stateFile), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := v.migrate(ctx, "migrate", f); err != nil {
		return fmt.Errorf("saving vm %s: %w", v.h.ID, err)
	}
	return v.waitMigration(ctx)
}

// migrate runs a migration command (migrate, migrate-incoming) on f. QEMU 7.2 has no
// file: URI, and exec: would need a shell that the sandbox forbids (spawn=deny); so the
// file, opened here, is passed over the monitor socket (getfd) and used as fd:.
func (v *vm) migrate(ctx context.Context, cmd string, f *os.File) error {
	v.mu.Lock()
	q := v.q
	v.mu.Unlock()
	if q == nil || v.IsExited() {
		return errdefs.New(errdefs.ErrConflict, "vm %s is not running", v.h.ID)
	}
	if _, err := q.runWithFile(ctx, "getfd", map[string]any{"fdname": stateFile}, f); err != nil {
		return err
	}
	_, err := q.run(ctx, cmd, map[string]any{"uri": "fd:" + stateFile})
	return err
}

// waitMigration polls until the migration in either direction has completed.
func (v *vm) waitMigration(ctx context.Context) error {
	for {
		raw, err := v.qmpRun(ctx, "query-migrate", nil)
		if err != nil {
			return err
		}
		var st struct {
			Status string `json:"status"`
			Error  string `json:"error-desc"`
		}
		json.Unmarshal(raw, &st)
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("vm %s: migration %s: %s", v.h.ID, st.Status, st.Error)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-v.Exited():
			return errdefs.New(errdefs.ErrUnavailable, "vm %s: qemu exited during migration%s", v.h.ID, vmm.LogTail(filepath.Join(v.h.Dir, vmmLog)))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Restore starts QEMU with cfg (the same devices the snapshot was taken with) and loads
// dir/state into it, then lets the guest run on from where it was saved.
func (d *Driver) Restore(ctx context.Context, cfg vmm.Config, dir string) (vmm.VM, error) {
	state, err := os.Open(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrNotFound, err, "no saved state in %s", dir)
	}
	defer state.Close()
	v, err := d.create(ctx, config{Config: cfg, incoming: true})
	if err != nil {
		return nil, err
	}
	fail := func(err error) (vmm.VM, error) {
		v.Destroy(context.WithoutCancel(ctx))
		return nil, err
	}
	if err := v.migrate(ctx, "migrate-incoming", state); err != nil {
		return fail(fmt.Errorf("restoring vm %s: %w", cfg.ID, err))
	}
	if err := v.waitMigration(ctx); err != nil {
		return fail(err)
	}
	if err := v.Start(ctx); err != nil {
		return fail(err)
	}
	return v, nil
}

// Stop presses the ACPI power button, which a kernel with ACPI (Debian's) reports, and
// Ctrl-Alt-Del on the i8042, which one without (kiln's own) does; kiln-init powers off on
// either. QEMU is killed if the guest is not gone within grace.
func (v *vm) Stop(ctx context.Context, grace time.Duration) error {
	return v.Process.Stop(ctx, grace, func(ctx context.Context) error {
		if _, err := v.qmpRun(ctx, "system_powerdown", nil); err != nil {
			return err
		}
		// The guest was asked; a failed key press must not cut its grace period short.
		v.qmpRun(ctx, "send-key", map[string]any{"keys": []map[string]string{
			{"type": "qcode", "data": "ctrl"}, {"type": "qcode", "data": "alt"}, {"type": "qcode", "data": "delete"}}})
		return nil
	})
}

func (v *vm) Detach() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.q != nil {
		v.q.close()
		v.q = nil
	}
	if v.con != nil {
		// A later Recover reads the console from here on.
		v.con.Close()
	}
	return nil
}

// Destroy kills QEMU and removes the driver's files from the VM's directory.
func (v *vm) Destroy(ctx context.Context) error {
	err := v.Kill(ctx)
	v.Detach()
	if v.conDone != nil {
		<-v.conDone // it must not write the log again once removed
	}
	if rerr := vmm.RemoveFiles(v.h.Dir, qmpSock, agentSock, consoleSock, consoleLog, consoleLog+".1", vmmLog); err == nil {
		err = rerr
	}
	return err
}

func (v *vm) Inspect(ctx context.Context) (vmm.Info, error) {
	info := vmm.Info{PID: v.h.PID, Accel: v.h.Accel, State: vmm.StateExited}
	if v.IsExited() {
		return info, nil
	}
	raw, err := v.qmpRun(ctx, "query-status", nil)
	if err != nil {
		if v.IsExited() {
			return info, nil
		}
		return info, err
	}
	var st struct {
		Status string `json:"status"`
	}
	json.Unmarshal(raw, &st)
	switch st.Status {
	case "prelaunch":
		info.State = vmm.StateCreated
	case "running":
		info.State = vmm.StateRunning
	case "paused":
		info.State = vmm.StatePaused
	case "shutdown", "guest-panicked", "internal-error":
		info.State = vmm.StateExited
	default:
		info.State = vmm.State(st.Status)
	}
	return info, nil
}

func (v *vm) DialAgent(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", filepath.Join(v.h.Dir, agentSock))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "connecting to the agent of vm %s", v.h.ID)
	}
	return c, nil
}
