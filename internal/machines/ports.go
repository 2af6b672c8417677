package machines

import (
	"context"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
)

// checkPorts refuses public ports that another app serves differently: a raw TCP port
// belongs to one app, an HTTP port is shared by Host name. self is the machine being
// updated, if any.
func (s *Service) checkPorts(ctx context.Context, app, self string, cfg api.MachineConfig) error {
	if len(cfg.Services) == 0 {
		return nil
	}
	if s.cfg.Net == nil {
		return errdefs.Invalid("config.services: this server runs without machine networking (--network=false), so nothing can reach a service; remove the services or turn networking on")
	}
	type use struct {
		app, machine string
		http         bool
	}
	taken := map[int]use{}
	ms, err := s.cfg.Store.AllMachines(ctx)
	if err != nil {
		return err
	}
	for _, rec := range ms {
		if rec.ID == self || rec.State == machine.Destroyed || rec.State == machine.Destroying {
			continue
		}
		for _, svc := range machine.DecodeConfig(rec.Config).Services {
			for _, p := range svc.Ports {
				taken[p.Port] = use{rec.App, rec.ID, len(p.Handlers) > 0}
			}
		}
	}
	for _, svc := range cfg.Services {
		for _, p := range svc.Ports {
			u, ok := taken[p.Port]
			http := len(p.Handlers) > 0
			switch {
			case !ok:
			case u.app != app && !(http && u.http):
				return errdefs.New(errdefs.ErrConflict, "port %d is already used by app %s: a raw TCP port belongs to one app; choose another port", p.Port, u.app)
			case http != u.http:
				return errdefs.New(errdefs.ErrConflict, "port %d is served as %s by machine %s: services on one port must agree on handlers", p.Port, map[bool]string{true: "HTTP", false: "raw TCP"}[u.http], u.machine)
			}
		}
	}
	return nil
}
