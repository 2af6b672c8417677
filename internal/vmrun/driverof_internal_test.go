package vmrun

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnhq/kiln/internal/vmm"
)

// recoverer is a driver that records the VMs it was asked to recover.
type recoverer struct {
	vmm.Driver
	name      string
	recovered []string
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
}
