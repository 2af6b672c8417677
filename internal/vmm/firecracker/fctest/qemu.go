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
	// Confine is the user QEMU runs as: a jailed Firecracker's.
	Confine vmm.Confine

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
		Cmdline: bootArgs(cfg.Boot.BootArgs), Accel: vmm.AccelTCG, Confine: b.Confine,
		// As under Firecracker, the guest finds its devices on the command line.
		NoACPI: true,
	}
	for _, d := range cfg.Drives {
		qc.Disks = append(qc.Disks, vmm.Disk{Path: d.PathOnHost, ReadOnly: d.IsReadOnly})
	}
	for _, n := range cfg.Ifaces {
		qc.NICs = append(qc.NICs, vmm.NIC{HostDev: n.HostDevName, MAC: n.GuestMAC})
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
// start the same QEMU again. QEMU's own state follows it in that file, so that it travels
// with the file (into and out of a jail) as Firecracker's does.
type snapshotMeta struct {
	Config vmm.Config `json:"config"`
	Vsock  string     `json:"vsock"`
}

func (b *QEMUBackend) SnapshotCreate(c fc.SnapshotCreate) error {
	vm, err := b.current()
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(b.Dir, "snapshot")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if err := vm.(vmm.Snapshotter).Snapshot(context.Background(), tmp); err != nil {
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
	return writeVMState(c.SnapshotPath, meta, tmp)
}

// writeVMState writes meta, a newline, and the one file QEMU saved in dir.
func writeVMState(path string, meta []byte, dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) != 1 {
		return fmt.Errorf("qemu saved %d files (%v), want 1", len(ents), err)
	}
	in, err := os.Open(filepath.Join(dir, ents[0].Name()))
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := out.Write(append(meta, '\n')); err != nil {
		out.Close()
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func (b *QEMUBackend) SnapshotLoad(l fc.SnapshotLoad) error {
	in, err := os.Open(l.SnapshotPath)
	if err != nil {
		return err
	}
	defer in.Close()
	r := bufio.NewReader(in)
	line, _ := r.ReadBytes('\n')
	var meta snapshotMeta
	if err := json.Unmarshal(line, &meta); err != nil {
		return fmt.Errorf("%s is not a snapshot of this test server: %w", l.SnapshotPath, err)
	}
	if err := os.MkdirAll(b.Dir, 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(b.Dir, "restore")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	st, err := os.Create(filepath.Join(tmp, "state"))
	if err != nil {
		return err
	}
	_, err = io.Copy(st, r)
	if cerr := st.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	ctx := context.Background()
	vm, err := (&qemu.Driver{KillWithParent: true}).Restore(ctx, meta.Config, tmp)
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
