package daemon

import (
	"context"
	"errors"
	"fmt"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/deploy"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/proxy"
	"github.com/kilnhq/kiln/internal/store"
)

// deployMachines lets deploys change machines through the machines service, like any
// API call, so that every rule (capacity, ports, volumes) holds for them too.
type deployMachines struct {
	db interface {
		ListMachines(ctx context.Context, app string) ([]store.Machine, error)
		AppMetadata(ctx context.Context, app string) (map[string]map[string]string, error)
		SetCordoned(ctx context.Context, id string, cordoned bool) error
		ListVolumes(ctx context.Context, app string) ([]store.Volume, error)
	}
	mgr *machines.Service
}

var _ deploy.Machines = deployMachines{}

func (d deployMachines) List(ctx context.Context, app string) ([]store.Machine, []api.MachineConfig, error) {
	ms, err := d.db.ListMachines(ctx, app)
	if err != nil {
		return nil, nil, err
	}
	md, err := d.db.AppMetadata(ctx, app)
	if err != nil {
		return nil, nil, err
	}
	var recs []store.Machine
	var cfgs []api.MachineConfig
	for _, m := range ms {
		if m.State == machine.Destroyed {
			continue
		}
		cfg := machine.DecodeConfig(m.Config)
		cfg.Metadata = md[m.ID]
		recs, cfgs = append(recs, m), append(cfgs, cfg)
	}
	return recs, cfgs, nil
}

func (d deployMachines) Get(ctx context.Context, id string) (store.Machine, error) {
	return d.mgr.Get(ctx, id)
}

func (d deployMachines) Create(ctx context.Context, app string, req api.CreateMachineRequest) (store.Machine, error) {
	m, _, err := d.mgr.Create(ctx, app, req)
	return m, err
}

func (d deployMachines) Update(ctx context.Context, id string, req api.CreateMachineRequest) (store.Machine, error) {
	return d.mgr.Update(ctx, id, req)
}

func (d deployMachines) Start(ctx context.Context, id string) error { return d.mgr.Start(ctx, id) }

func (d deployMachines) Destroy(ctx context.Context, id string) error {
	return d.mgr.Destroy(ctx, id, true)
}

func (d deployMachines) SetCordoned(ctx context.Context, id string, on bool) error {
	return d.db.SetCordoned(ctx, id, on)
}

// Volume gives a new machine a volume of the mount's source: one nobody holds, or a new
// one named source, then source_2, source_3...
func (d deployMachines) Volume(ctx context.Context, app, source string, sizeGB int) (string, error) {
	vs, err := d.db.ListVolumes(ctx, app)
	if err != nil {
		return "", err
	}
	taken := map[string]bool{}
	for _, v := range vs {
		taken[v.Name] = true
		if v.AttachedMachine == "" && deploy.VolumeFamily(v.Name) == source {
			return v.Name, nil
		}
	}
	name := source
	for n := 2; taken[name]; n++ {
		name = fmt.Sprintf("%s_%d", source, n)
	}
	v, err := d.mgr.CreateVolume(ctx, app, machines.VolumeSpec{Name: name, SizeGB: sizeGB})
	if err != nil {
		if errors.Is(err, errdefs.ErrInvalid) {
			return "", errdefs.Wrap(errdefs.ErrInvalid, err, "[mounts] source %q", source)
		}
		return "", err
	}
	return v.Name, nil
}

// deployHealth reads machines' checks from the proxy.
type deployHealth struct{ px *proxy.Proxy }

func (h deployHealth) Health(id string) deploy.HealthState {
	if h.px == nil {
		return deploy.HealthState{}
	}
	s := h.px.Health(id)
	return deploy.HealthState{StartedAt: s.StartedAt, Rounds: s.Rounds, Passing: s.Passing, Inflight: s.Inflight, Cordoned: s.Cordoned, Known: s.Known}
}
