package fctest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/vmm"
	fc "github.com/kilnhq/kiln/internal/vmm/firecracker"
	"github.com/kilnhq/kiln/internal/vmm/qemu"
)

// QEMUBackend boots what the API configured under QEMU (software emulation) and bridges
// Firecracker's vsock convention to the guest agent: a connection to the vsock Unix
// socket that says "CONNECT 1024" is joined to the guest's agent port.
type QEMUBackend struct {
	ID  string
	Dir string // QEMU's own files
	// Console receives the guest's serial console, as Firecracker's stdout does.
	Console io.Writer

	mu     sync.Mutex
	vm     vmm.VM
	cfg    vmm.Config // what the QEMU behind the API runs
	vsock  string     // the vsock socket path the API configured
	ln     net.Listener
	exited chan struct{} // made on first use by Exited
}

// Exited is closed when the guest's VMM has exited; Firecracker exits then too.
func (b *QEMUBackend) Exited() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.exited == nil {
		b.exited = make(chan struct{})
	}
	return b.exited
}

// bootArgs drops the arguments that only make sense on Firecracker's devices; QEMU's
// driver adds its own reboot method.
func bootArgs(s string) string {
	var keep []string
	for _, f := range strings.Fields(s) {
		if strings.HasPrefix(f, "reboot=") || strings.HasPrefix(f, "i8042.") {
			continue
		}
		keep = append(keep, f)
	}
	return strings.Join(keep, " ")
}

func (b *QEMUBackend) Start(cfg Config) error {
	if err := os.MkdirAll(b.Dir, 0o755); err != nil {
		return err
	}
	qc := vmm.Config{
		ID: b.ID, Dir: b.Dir, CPUs: cfg.Machine.VCPUCount, MemoryMiB: cfg.Machine.MemSizeMib,
		Kernel: cfg.Boot.KernelImagePath, Initramfs: cfg.Boot.InitrdPath,
		Cmdline: bootArgs(cfg.Boot.BootArgs), Accel: vmm.AccelTCG,
	}
	for _, d := range cfg.Drives {
		qc.Disks = append(qc.Disks, vmm.Disk{Path: d.PathOnHost, ReadOnly: d.IsReadOnly})
	}
	ctx := context.Background()
	vm, err := (&qemu.Driver{KillWithParent: true}).Create(ctx, qc)
	if err != nil {
		return err
	}
	vsock := ""
	if cfg.Vsock != nil {
		vsock = cfg.Vsock.UDSPath
	}
	if err := b.run(vm, qc, vsock); err != nil {
		return err
	}
	return vm.Start(ctx)
}

// run serves a created or restored VM: vsock bridge, console, exit.
func (b *QEMUBackend) run(vm vmm.VM, qc vmm.Config, vsock string) error {
	if vsock != "" {
		os.Remove(vsock)
		ln, err := net.Listen("unix", vsock)
		if err != nil {
			vm.Destroy(context.Background())
			return fmt.Errorf("vsock: %w", err)
		}
		b.ln = ln
		go b.serveVsock(ln, vm)
	}
	b.mu.Lock()
	b.vm, b.cfg, b.vsock = vm, qc, vsock
	b.mu.Unlock()
	b.Exited()
	go b.tailConsole(vm)
	go func() {
		<-vm.Wait()
		close(b.exited)
	}()
	return nil
}

func (b *QEMUBackend) serveVsock(ln net.Listener, vm vmm.VM) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			line, err := bufio.NewReader(io.LimitReader(c, 64)).ReadString('\n')
			if err != nil {
				return
			}
			port, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "CONNECT ")))
			if !strings.HasPrefix(line, "CONNECT ") || err != nil || port != guest.VsockPort {
				return // Firecracker closes connections to ports nobody listens on
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			agent, err := vm.DialAgent(ctx)
			cancel()
			if err != nil {
				return
			}
			defer agent.Close()
			fmt.Fprintf(c, "OK %d\n", 1073741824)
			done := make(chan struct{}, 2)
			go func() { io.Copy(agent, c); done <- struct{}{} }()
			go func() { io.Copy(c, agent); done <- struct{}{} }()
			<-done
		}()
	}
}

// tailConsole copies QEMU's console log to Console until the VM exits.
func (b *QEMUBackend) tailConsole(vm vmm.VM) {
	if b.Console == nil {
		return
	}
	var off int64
	for {
		f, err := os.Open(vm.ConsoleLog())
		if err == nil {
			f.Seek(off, io.SeekStart)
			n, _ := io.Copy(b.Console, f)
			off += n
			f.Close()
		}
		select {
		case <-vm.Wait():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (b *QEMUBackend) current() (vmm.VM, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.vm == nil {
		return nil, errors.New("no VM")
	}
	return b.vm, nil
}

func (b *QEMUBackend) CtrlAltDel() error {
	vm, err := b.current()
	if err != nil {
		return err
	}
	// Firecracker only delivers the key press; the guest decides. The power button is
	// QEMU's equivalent, and kiln-init powers off on either.
	go vm.Stop(context.Background(), time.Hour)
	return nil
}

func (b *QEMUBackend) Pause() error {
	vm, err := b.current()
	if err != nil {
		return err
	}
	return vm.(vmm.Snapshotter).Pause(context.Background())
}

func (b *QEMUBackend) Resume() error {
	vm, err := b.current()
	if err != nil {
		return err
	}
	return vm.(vmm.Snapshotter).Resume(context.Background())
}

// snapshotMeta is what the test server keeps in Firecracker's "vmstate" file: enough to
// start the same QEMU again. QEMU's own state goes next to the memory file.
type snapshotMeta struct {
	Config vmm.Config `json:"config"`
	Vsock  string     `json:"vsock"`
}

func (b *QEMUBackend) SnapshotCreate(c fc.SnapshotCreate) error {
	vm, err := b.current()
	if err != nil {
		return err
	}
	if err := vm.(vmm.Snapshotter).Snapshot(context.Background(), filepath.Dir(c.MemFilePath)); err != nil {
		return err
	}
	b.mu.Lock()
	meta, _ := json.Marshal(snapshotMeta{Config: b.cfg, Vsock: b.vsock})
	mem := int64(b.cfg.MemoryMiB) << 20
	b.mu.Unlock()
	// Guest memory is in QEMU's own file beside it; Firecracker's memory file (Full or
	// Diff) is written as a file of the guest's size with no data, so that what merges
	// Diffs onto a base file runs here too.
	f, err := os.Create(c.MemFilePath)
	if err != nil {
		return err
	}
	if err := f.Truncate(mem); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.WriteFile(c.SnapshotPath, meta, 0o644)
}

func (b *QEMUBackend) SnapshotLoad(l fc.SnapshotLoad) error {
	raw, err := os.ReadFile(l.SnapshotPath)
	if err != nil {
		return err
	}
	var meta snapshotMeta
	if err := json.Unmarshal(raw, &meta); err != nil {
		return fmt.Errorf("%s is not a snapshot of this test server: %w", l.SnapshotPath, err)
	}
	mem := l.MemFilePath
	if l.MemBackend != nil {
		mem = l.MemBackend.BackendPath
	}
	ctx := context.Background()
	vm, err := (&qemu.Driver{KillWithParent: true}).Restore(ctx, meta.Config, filepath.Dir(mem))
	if err != nil {
		return err
	}
	if err := b.run(vm, meta.Config, meta.Vsock); err != nil {
		return err
	}
	if !l.ResumeVM {
		return vm.(vmm.Snapshotter).Pause(ctx)
	}
	return nil
}

// Close stops the VM and removes QEMU's files.
func (b *QEMUBackend) Close() {
	if b.ln != nil {
		b.ln.Close()
	}
	if vm, err := b.current(); err == nil {
		vm.Destroy(context.Background())
	}
	os.Remove(b.Dir)
}
