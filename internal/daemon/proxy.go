package daemon

import (
	"context"
	"errors"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/proxy"
	"github.com/kilnhq/kiln/internal/store"
)

// proxyMachines lets the proxy see machines with services and start or stop them through
// the machines service, like any API call.
type proxyMachines struct {
	db interface {
		AllMachines(ctx context.Context) ([]store.Machine, error)
	}
	mgr  *machines.Service
	nets *network.Manager
	wake time.Duration
}

func (p proxyMachines) Targets(ctx context.Context) ([]proxy.Target, error) {
	ms, err := p.db.AllMachines(ctx)
	if err != nil {
		return nil, err
	}
	var out []proxy.Target
	for _, m := range ms {
		cfg := machine.DecodeConfig(m.Config)
		if len(cfg.Services) == 0 || m.State == machine.Destroyed {
			continue
		}
		l, ok := p.nets.Lookup(m.ID)
		if !ok {
			continue // never booted yet: it gets its address on its first start
		}
		out = append(out, proxy.Target{ID: m.ID, App: m.App, State: m.State, Addr: l.Addr.Addr(), Services: cfg.Services, Cordoned: m.Cordoned})
	}
	return out, nil
}

func (p proxyMachines) Start(ctx context.Context, id string) error {
	if err := p.mgr.Start(ctx, id); err != nil && !errors.Is(err, errdefs.ErrConflict) {
		return err
	}
	return p.mgr.Wait(ctx, id, machine.Started, p.wake)
}

func (p proxyMachines) Stop(ctx context.Context, id string) error    { return p.mgr.Stop(ctx, id) }
func (p proxyMachines) Suspend(ctx context.Context, id string) error { return p.mgr.Suspend(ctx, id) }
