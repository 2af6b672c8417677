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
	vmmLog     = "vmm.log"
)

// Args returns QEMU's command line for cfg. Exported for tests and `--verbose`.
func Args(cfg vmm.Config) []string {
	accel, cpu := "tcg,thread=multi,tb-size=64", "max"
	if cfg.Accel == vmm.AccelKVM {
		accel, cpu = "kvm", "host"
	}
	cmdline := vmm.BaseCmdline + " reboot=t"
	if cfg.Cmdline != "" {
		cmdline += " " + cfg.Cmdline
	}
	a := []string{
		"-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
		"-accel", accel, "-cpu", cpu,
		"-smp", fmt.Sprint(cfg.CPUs), "-m", fmt.Sprintf("%dM", cfg.MemoryMiB),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-S",
		"-kernel", cfg.Kernel, "-append", cmdline,
		"-chardev", "file,id=con,path=" + filepath.Join(cfg.Dir, consoleLog),
		"-serial", "chardev:con",
		"-qmp", "unix:" + filepath.Join(cfg.Dir, qmpSock) + ",server=on,wait=off",
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path=" + filepath.Join(cfg.Dir, agentSock) + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=" + guest.PortName,
	}
	if cfg.Initramfs != "" {
		a = append(a, "-initrd", cfg.Initramfs)
	}
	for i, d := range cfg.Disks {
		opt := fmt.Sprintf("id=disk%d,file=%s,format=raw,if=none", i, d.Path)
		if d.ReadOnly {
			opt += ",readonly=on"
		}
		a = append(a, "-drive", opt, "-device", fmt.Sprintf("virtio-blk-device,drive=disk%d", i))
	}
	for i, n := range cfg.NICs {
		dev := fmt.Sprintf("virtio-net-device,netdev=net%d", i)
		if n.MAC != "" {
			dev += ",mac=" + n.MAC
		}
		a = append(a, "-netdev", fmt.Sprintf("tap,id=net%d,ifname=%s,script=no,downscript=no", i, n.HostDev), "-device", dev)
	}
	return a
}

type vm struct {
	*vmm.Process
	h  vmm.Handle
	mu sync.Mutex
	q  *qmp
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
	// Sockets of an earlier VMM in this directory (a restore) must not be in the way.
	vmm.RemoveFiles(cfg.Dir, qmpSock, agentSock)
	logf, err := os.Create(filepath.Join(cfg.Dir, vmmLog))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	args := Args(cfg.Config)
	if cfg.incoming {
		args = append(args, "-incoming", "defer")
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own session: a terminal's Ctrl-C reaches kiln, which then stops the VM in order,
	// instead of reaching QEMU directly.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if d.KillWithParent {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	proc, err := vmm.StartProcess(cmd)
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
	return v, nil
}

func (v *vm) Handle() vmm.Handle    { return v.h }
func (v *vm) Wait() <-chan struct{} { return v.Exited() }
func (v *vm) ConsoleLog() string    { return filepath.Join(v.h.Dir, consoleLog) }

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
	// QEMU 7.2 has no file: migration URI; exec: runs the command with /bin/sh.
	uri := "exec:cat > " + shellQuote(filepath.Join(dir, stateFile))
	if _, err := v.qmpRun(ctx, "migrate", map[string]any{"uri": uri}); err != nil {
		return fmt.Errorf("saving vm %s: %w", v.h.ID, err)
	}
	return v.waitMigration(ctx)
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

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// Restore starts QEMU with cfg (the same devices the snapshot was taken with) and loads
// dir/state into it, then lets the guest run on from where it was saved.
func (d *Driver) Restore(ctx context.Context, cfg vmm.Config, dir string) (vmm.VM, error) {
	state := filepath.Join(dir, stateFile)
	if _, err := os.Stat(state); err != nil {
		return nil, errdefs.New(errdefs.ErrNotFound, "no saved state in %s: %v", dir, err)
	}
	v, err := d.create(ctx, config{Config: cfg, incoming: true})
	if err != nil {
		return nil, err
	}
	fail := func(err error) (vmm.VM, error) {
		v.Destroy(context.WithoutCancel(ctx))
		return nil, err
	}
	if _, err := v.qmpRun(ctx, "migrate-incoming", map[string]any{"uri": "exec:cat " + shellQuote(state)}); err != nil {
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

// Stop presses the ACPI power button (kiln-init powers off on it) and kills QEMU if the
// guest is not gone within grace.
func (v *vm) Stop(ctx context.Context, grace time.Duration) error {
	return v.Process.Stop(ctx, grace, func(ctx context.Context) error {
		_, err := v.qmpRun(ctx, "system_powerdown", nil)
		return err
	})
}

func (v *vm) Detach() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.q != nil {
		v.q.close()
		v.q = nil
	}
	return nil
}

// Destroy kills QEMU and removes the driver's files from the VM's directory.
func (v *vm) Destroy(ctx context.Context) error {
	err := v.Kill(ctx)
	v.Detach()
	if rerr := vmm.RemoveFiles(v.h.Dir, qmpSock, agentSock, consoleLog, vmmLog); err == nil {
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
		return nil, errdefs.New(errdefs.ErrUnavailable, "connecting to the agent of vm %s: %v", v.h.ID, err)
	}
	return c, nil
}
