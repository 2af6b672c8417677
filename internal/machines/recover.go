package machines

import (
	"context"
	"errors"
	"fmt"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

// Recover reconciles the host with the store after a (re)start: networks first, then
// the supervisor picks every machine of this host up where the last kiln left it, then
// volumes held by machines that are gone are let go.
func (s *Service) Recover(ctx context.Context) error {
	var mine []store.Machine
	all, err := s.cfg.Store.AllMachines(ctx)
	if err != nil {
		return err
	}
	for _, rec := range all {
		if s.Mine(rec) && rec.State != machine.Destroyed {
			mine = append(mine, rec)
		}
	}
	apps, err := s.cfg.Store.ListApps(ctx)
	if err != nil {
		return err
	}
	if s.cfg.Net != nil {
		// Devices first: VMs about to be adopted or resumed need their TAP devices, and
		// those of machines gone while kiln was down must go.
		exists := map[string]bool{}
		for _, rec := range mine {
			if rec.State != machine.Destroying {
				exists[rec.ID] = true
			}
		}
		if err := s.cfg.Net.Reconcile(ctx, func(id string) bool { return exists[id] }); err != nil {
			return fmt.Errorf("restoring machines' networks: %w", err)
		}
	}
	if err := s.sup.Recover(ctx, mine); err != nil {
		return err
	}
	s.releaseOrphanVolumes(ctx, apps)
	return nil
}

// releaseOrphanVolumes lets go of volumes held by machines that do not exist or are
// destroyed: claims that a kiln older than the one-transaction create, or a crash in a
// destroy, left behind. Such a volume could otherwise never be attached again.
func (s *Service) releaseOrphanVolumes(ctx context.Context, apps []string) {
	for _, app := range apps {
		vs, err := s.cfg.Store.ListVolumes(ctx, app)
		if err != nil {
			continue
		}
		for _, v := range vs {
			if v.AttachedMachine == "" {
				continue
			}
			rec, err := s.cfg.Store.GetMachine(ctx, v.AttachedMachine)
			if err == nil && rec.State != machine.Destroyed {
				continue
			}
			if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
				continue
			}
			s.logf(ctx, "volume %s: releasing it from machine %s, which is gone", v.Name, v.AttachedMachine)
			if err := s.cfg.Store.DetachVolumes(ctx, v.AttachedMachine); err != nil {
				s.logf(ctx, "volume %s: %v", v.Name, err)
			}
		}
	}
}
