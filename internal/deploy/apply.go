package deploy

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/appconfig"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

// converge applies the plan from spec to the machines as they are now, by strategy.
func (e *Engine) converge(ctx context.Context, rel *store.Release, spec Spec, version, secrets int, strategy string) error {
	p, err := e.plan(ctx, rel.App, spec, version, secrets, strategy)
	if err != nil {
		return err
	}
	wait := spec.Config.WaitTimeout()
	sizes := volumeSizes(spec.Config)
	for i := range p.Steps {
		p.Steps[i].VolumeGB = sizes
	}
	var changing, creates, destroys, cordoned []Step
	for _, s := range p.Steps {
		switch {
		case s.Change == Update || s.Change == Replace:
			changing = append(changing, s)
		case s.Change == Create:
			creates = append(creates, s)
		case s.Change == Destroy:
			destroys = append(destroys, s)
		case s.Cordoned:
			cordoned = append(cordoned, s)
		}
	}
	// A kept machine a cut-short deploy left out of service comes back once healthy.
	for _, s := range cordoned {
		if err := e.readmit(ctx, rel, s, wait); err != nil {
			return err
		}
	}
	var chunks [][]Step
	switch strategy {
	case "immediate", "bluegreen":
		chunks = [][]Step{changing}
	case "canary":
		if len(changing) > 0 {
			chunks = append(chunks, changing[:1])
			changing = changing[1:]
		}
		fallthrough
	default: // rolling: max_unavailable of each group's machines at a time
		kept := map[string]int{}
		for _, st := range p.Steps {
			if st.Machine != "" && st.Change != Destroy {
				kept[st.Group]++
			}
		}
		byGroup := map[string][]Step{}
		var groups []string
		for _, st := range changing {
			if byGroup[st.Group] == nil {
				groups = append(groups, st.Group)
			}
			byGroup[st.Group] = append(byGroup[st.Group], st)
		}
		for _, g := range groups {
			steps, n := byGroup[g], spec.Config.MaxUnavailable(kept[g])
			for len(steps) > 0 {
				k := min(max(n, 1), len(steps))
				chunks = append(chunks, steps[:k])
				steps = steps[k:]
			}
		}
	}
	done, total := 0, len(p.Steps)-len(cordoned)
	for _, st := range p.Steps {
		if st.Change == None && !st.Cordoned {
			total--
		}
	}
	progress := func(what string) {
		rel.Message = fmt.Sprintf("%s (%d of %d machines done)", what, done, total)
		e.Store.UpdateRelease(ctx, *rel, rel.State)
	}
	for _, s := range creates {
		progress("creating a machine of group " + s.Group)
		if _, err := e.create(ctx, rel.App, s, wait); err != nil {
			return err
		}
		done++
	}
	for _, chunk := range chunks {
		if len(chunk) == 0 {
			continue
		}
		progress(fmt.Sprintf("changing %d machine(s) by %s", len(chunk), strategy))
		if err := e.change(ctx, rel.App, chunk, wait, strategy); err != nil {
			return err
		}
		done += len(chunk)
	}
	for _, s := range destroys {
		progress("destroying machine " + s.Machine)
		if err := e.retire(ctx, s.Machine); err != nil {
			return err
		}
		done++
	}
	return nil
}

// change applies a chunk of updates and replaces: the machines leave service together,
// and each comes back once healthy. Replaces get their new machine first, and lose the
// old one only once the new one is healthy.
func (e *Engine) change(ctx context.Context, app string, chunk []Step, wait time.Duration, strategy string) error {
	var updates, replaces []Step
	for _, s := range chunk {
		if s.Change == Update {
			updates = append(updates, s)
		} else {
			replaces = append(replaces, s)
		}
	}
	// Replaces: every new machine is made and healthy before any old one goes (for
	// bluegreen, that is the whole app at once).
	var fresh []string
	for _, s := range replaces {
		id, err := e.create(ctx, app, s, 0)
		if err != nil {
			return err
		}
		fresh = append(fresh, id)
	}
	for i, id := range fresh {
		if err := e.healthy(ctx, id, replaces[i].Config, time.Time{}, wait); err != nil {
			return err
		}
	}
	for _, id := range fresh {
		if err := e.Machines.SetCordoned(ctx, id, false); err != nil {
			return err
		}
	}
	for _, s := range replaces {
		if err := e.retire(ctx, s.Machine); err != nil {
			return err
		}
	}
	if len(updates) == 0 {
		return nil
	}
	for _, s := range updates {
		if err := e.Machines.SetCordoned(ctx, s.Machine, true); err != nil {
			return err
		}
	}
	for _, s := range updates {
		e.drained(ctx, s.Machine)
	}
	since := time.Now()
	for _, s := range updates {
		if _, err := e.Machines.Update(ctx, s.Machine, api.CreateMachineRequest{Config: s.Config}); err != nil {
			return err
		}
	}
	for _, s := range updates {
		if strategy == "immediate" {
			continue
		}
		if err := e.healthy(ctx, s.Machine, s.Config, since, wait); err != nil {
			return err
		}
	}
	for _, s := range updates {
		if err := e.Machines.SetCordoned(ctx, s.Machine, false); err != nil {
			return err
		}
	}
	return nil
}

// create makes a machine for a step, out of service; with wait > 0 it waits for it to
// be healthy and lets it in.
func (e *Engine) create(ctx context.Context, app string, s Step, wait time.Duration) (string, error) {
	cfg := s.Config
	cfg.Mounts = append([]api.Mount(nil), cfg.Mounts...)
	for i, mt := range cfg.Mounts {
		size := s.VolumeGB[mt.Path]
		if size < 1 {
			size = 1
		}
		name, err := e.Machines.Volume(ctx, app, VolumeFamily(mt.Volume), size)
		if err != nil {
			return "", err
		}
		cfg.Mounts[i].Volume = name
	}
	m, err := e.Machines.Create(ctx, app, api.CreateMachineRequest{Config: cfg, SkipServiceRegistration: true})
	if err != nil {
		return "", err
	}
	if wait == 0 {
		return m.ID, nil
	}
	if err := e.healthy(ctx, m.ID, cfg, time.Time{}, wait); err != nil {
		return m.ID, err
	}
	return m.ID, e.Machines.SetCordoned(ctx, m.ID, false)
}

// volumeSizes is the initial size, in GB, of each mount's volumes by destination (1 when
// the config gives none).
func volumeSizes(cfg appconfig.Config) map[string]int {
	out := map[string]int{}
	for _, m := range cfg.Mounts {
		gb, err := m.InitialSize.GB()
		if err != nil || gb < 1 {
			gb = 1
		}
		out[m.Destination] = gb
	}
	return out
}

// readmit brings a kept machine that is out of service back once it is healthy.
func (e *Engine) readmit(ctx context.Context, rel *store.Release, s Step, wait time.Duration) error {
	m, err := e.Machines.Get(ctx, s.Machine)
	if err != nil {
		return err
	}
	if m.State != machine.Started && m.State != machine.Starting {
		if err := e.Machines.Start(ctx, s.Machine); err != nil && !errors.Is(err, errdefs.ErrConflict) {
			return err
		}
	}
	if err := e.healthy(ctx, s.Machine, s.Config, time.Time{}, wait); err != nil {
		return err
	}
	return e.Machines.SetCordoned(ctx, s.Machine, false)
}

// retire takes a machine out of service, lets its requests finish, and destroys it.
func (e *Engine) retire(ctx context.Context, id string) error {
	if err := e.Machines.SetCordoned(ctx, id, true); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		return err
	}
	e.drained(ctx, id)
	if err := e.Machines.Destroy(ctx, id); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		return err
	}
	return nil
}
