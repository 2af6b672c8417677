package supervisor

import (
	"context"
	"errors"
	"fmt"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

// Recover starts supervision after a (re)start from what the store and the VM
// directory say: VMs of machines that should run are adopted and followed by the same
// loop as any start; saved VMs of suspended machines are kept for their resume;
// machines whose VM died go through their restart policy; VMs no machine should have
// are destroyed and reported. machines are this host's machines, from the store.
func (s *Supervisor) Recover(ctx context.Context, machines []store.Machine) error {
	owned, err := s.cfg.Runtime.Owned(ctx)
	if err != nil {
		return err
	}
	adopted := map[string]VM{}
	for _, o := range owned {
		if ctx.Err() != nil {
			return ctx.Err() // interrupted: leave the rest for the next start
		}
		rec, err := s.cfg.Store.GetMachine(ctx, o.Owner)
		if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			return fmt.Errorf("reading machine %s: %w", o.Owner, err)
		}
		switch {
		case err == nil && rec.State == machine.Suspended:
			if err := s.cfg.Runtime.Restore(ctx, o); err != nil {
				s.logf("machine %s: its saved VM %s is unusable (%v); it will boot cold", o.Owner, o.ID, err)
				s.cfg.Store.Note(ctx, o.Owner, machine.Event{Type: string(machine.EvResumeFailed), Source: machine.SourceKiln, Message: err.Error()})
			}
		case err == nil && (rec.State == machine.Started || rec.State == machine.Stopping):
			vm, err := s.cfg.Runtime.Adopt(ctx, o, rec)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				// Its VMM is gone or its agent does not answer: the machine is handled
				// below like one whose VM died.
				s.logf("machine %s: its VM %s cannot be adopted: %v", o.Owner, o.ID, err)
				continue
			}
			s.logf("machine %s: re-adopted its running VM %s", o.Owner, o.ID)
			adopted[o.Owner] = vm
		default:
			s.cfg.Runtime.DestroyOwned(ctx, o)
			s.logf("destroyed VM %s: no running machine owns it (owner %s)", o.ID, o.Owner)
		}
	}
	for _, rec := range machines {
		s.resume(ctx, rec, adopted[rec.ID])
	}
	return nil
}

// resume picks up one machine where the last kiln left it.
func (s *Supervisor) resume(ctx context.Context, rec store.Machine, vm VM) {
	id := rec.ID
	cfg := machine.DecodeConfig(rec.Config)
	switch rec.State {
	case machine.Started:
		if vm != nil {
			s.launch(s.ctx, id, vm)
			return
		}
		s.logf("machine %s: its VM is gone; applying its restart policy", id)
		f := machine.Facts{Exited: true, Restart: restartPolicy(cfg), AutoDestroy: cfg.AutoDestroy}
		s.step(ctx, id, rec.State, machine.InVMGone, f, func(e machine.Effect) error {
			if e == machine.Launch {
				s.launch(s.ctx, id, nil)
			}
			return s.common(ctx, id, e)
		})
	case machine.Stopping:
		if vm == nil {
			s.step(ctx, id, rec.State, machine.InVMDown, machine.Facts{}, s.noEffects(id))
			return
		}
		// A stop was under way when kiln went down: its run finishes it, as any stop,
		// without holding up the recovery of the other machines.
		s.launch(s.ctx, id, vm)
		s.run(id).request(halt, Request{})
	case machine.Starting:
		s.logf("machine %s: was starting when kiln stopped; starting it again", id)
		s.launch(s.ctx, id, nil)
	case machine.Suspending:
		// The save was cut short: whatever it left is not a VM to resume.
		s.cfg.Runtime.Discard(ctx, id)
		s.step(ctx, id, rec.State, machine.InNoSupervisor, machine.Facts{}, s.noEffects(id))
	case machine.Destroying:
		// Kiln stopped part-way through a destroy; the steps left are safe to redo.
		if err := s.common(ctx, id, machine.Remove); err != nil {
			s.logf("machine %s: finishing its destroy: %v", id, err)
			return
		}
		s.step(ctx, id, rec.State, machine.InRemoved, machine.Facts{}, s.noEffects(id))
	}
}
