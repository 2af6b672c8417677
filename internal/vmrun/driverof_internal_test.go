package vmrun

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnhq/kiln/internal/vmm"
)

// recoverer is a driver that records the VMs it was asked to recover and restore.
type recoverer struct {
	vmm.Driver
	name      string
	recovered []string
	restored  []string
}

func (r *recoverer) Restore(_ context.Context, cfg vmm.Config, _ string) (vmm.VM, error) {
	r.restored = append(r.restored, cfg.ID)
	return nil, errors.New("no snapshot")
}

func (r *recoverer) Name() string { return r.name }
func (r *recoverer) Recover(_ context.Context, h vmm.Handle) (vmm.VM, error) {
	r.recovered = append(r.recovered, h.ID)
	return nil, errors.New("gone")
}

// A VM an earlier kiln started under another driver (the operator changed --vmm) is
// recovered by that driver, which alone can release its jail, user and devices.
func TestAdoptUsesTheVMsOwnDriver(t *testing.T) {
	qemu, fc := &recoverer{name: "qemu"}, &recoverer{name: "firecracker"}
	rt := &Runtime{DataDir: t.TempDir(), Driver: qemu, Drivers: map[string]vmm.Driver{"qemu": qemu, "firecracker": fc}}
	for id, driver := range map[string]string{"vm-fc": "firecracker", "vm-q": "qemu"} {
		dir := filepath.Join(rt.vmsDir(), id)
		os.MkdirAll(dir, 0o755)
		if err := writeRecord(dir, record{ID: id, Handle: vmm.Handle{Driver: driver, ID: id, Dir: dir}}); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	rt.Adopt(ctx, "vm-fc")
	rt.Saved(ctx, "vm-q")
	if len(fc.recovered) != 1 || fc.recovered[0] != "vm-fc" || len(qemu.recovered) != 1 || qemu.recovered[0] != "vm-q" {
		t.Errorf("firecracker recovered %v, qemu %v; want each its own VM", fc.recovered, qemu.recovered)
	}
	// A suspended VM is restored by the driver that saved it.
	os.MkdirAll(filepath.Join(rt.vmsDir(), "vm-fc", "snapshot"), 0o755)
	inst, err := rt.Saved(ctx, "vm-fc")
	if err != nil {
		t.Fatal(err)
	}
	inst.Config.ID = "vm-fc"
	inst.Resume(ctx)
	if len(fc.restored) != 1 || len(qemu.restored) != 0 {
		t.Errorf("firecracker restored %v, qemu %v; want firecracker's VM restored by firecracker", fc.restored, qemu.restored)
	}
}

// releaser is a driver that records the VMs it was asked to release.
type releaser struct {
	recoverer
	released []string
}

func (r *releaser) Release(id string) error { r.released = append(r.released, id); return nil }

// A VM left without a handle (kiln died right after starting its VMM) is reaped, and
// each driver releases what it keeps for it outside its directory.
func TestReapReleasesWithoutHandle(t *testing.T) {
	dataDir := t.TempDir()
	dir := filepath.Join(dataDir, "vms", "vm-nohandle")
	os.MkdirAll(dir, 0o755)
	if err := writeRecord(dir, record{ID: "vm-nohandle", OwnerPID: 999999999}); err != nil {
		t.Fatal(err)
	}
	fc := &releaser{recoverer: recoverer{name: "firecracker"}}
	if _, err := Reap(context.Background(), dataDir, map[string]vmm.Driver{"firecracker": fc}, io.Discard); err != nil {
		t.Fatal(err)
	}
	if len(fc.released) != 1 || fc.released[0] != "vm-nohandle" {
		t.Errorf("released %v, want the reaped VM", fc.released)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("the VM's directory is still there: %v", err)
	}
}
