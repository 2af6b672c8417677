package firecracker

import (
	"context"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/vmm"
)

type Driver struct{}

func (d *Driver) Name() string                   { return "firecracker" }
func (d *Driver) Capabilities() vmm.Capabilities { return vmm.Capabilities{Snapshot: true} }
func (d *Driver) Create(ctx context.Context, cfg vmm.Config) (vmm.VM, error) {
	return nil, errdefs.Invalid("todo")
}
func (d *Driver) Recover(ctx context.Context, h vmm.Handle) (vmm.VM, error) {
	return nil, errdefs.Invalid("todo")
}
