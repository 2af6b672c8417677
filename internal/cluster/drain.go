package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

// Machines is what draining asks of this host's machines: stop one and wait for it,
// and start one that now belongs to another host (which records the start; that host
// claims it).
type Machines interface {
	Start(ctx context.Context, id string) error
	Stop(ctx context.Context, id string) error
	Wait(ctx context.Context, id string, state machine.State, timeout time.Duration) error
}

// Network lets go of a machine's device on this host when it moves away.
type Network interface {
	Detach(ctx context.Context, id string) error
}

// Claimer starts supervising a machine in state starting that another host placed
// here; false if a supervisor runs it already.
type Claimer interface {
	Claim(id string) bool
}

// drainStopWait is how long a drain waits for one machine to stop.
const drainStopWait = 2 * time.Minute

// Drain cordons this host and moves its machines elsewhere: each one without volumes is
// stopped, given to the host with the most room and started there by that host's claim.
// Machines with volumes stay (their data is here), as do those nothing else can take;
// the report says why.
func (c *Cluster) Drain(ctx context.Context, ms Machines) (api.DrainReport, error) {
	name := c.cfg.Here.Name
	rep := api.DrainReport{Host: name, Moved: []api.DrainEntry{}, Kept: []api.DrainEntry{}}
	if err := c.SetCordoned(ctx, name, true); err != nil {
		return rep, err
	}
	recs, err := c.cfg.Store.MachinesOnHost(ctx, c.HomeHost())
	if err != nil {
		return rep, err
	}
	for _, rec := range recs {
		if rec.State == machine.Destroyed || rec.State == machine.Destroying {
			continue
		}
		to, why := c.move(ctx, ms, rec)
		if why != "" {
			rep.Kept = append(rep.Kept, api.DrainEntry{Machine: rec.ID, Why: why})
			continue
		}
		rep.Moved = append(rep.Moved, api.DrainEntry{Machine: rec.ID, To: to})
	}
	return rep, nil
}

// move gives one machine to another host; it returns the host, or why it stays.
func (c *Cluster) move(ctx context.Context, ms Machines, rec store.Machine) (to, why string) {
	var cfg api.MachineConfig
	json.Unmarshal(rec.Config, &cfg)
	if len(cfg.Mounts) > 0 {
		return "", "its volumes live on this host"
	}
	if machine.InternalApp(rec.App) {
		return "", "a builder stays with its project's cache on this host"
	}
	if !c.cfg.Shared {
		return "", "no other host shares this host's database"
	}
	to, err := c.Place(ctx, capacity.Size{CPUs: cfg.Guest.CPUs, MemoryMiB: cfg.Guest.MemoryMB})
	if err == nil && to == c.cfg.Here.Name {
		err = errors.New("no other host has room")
	}
	if err != nil {
		return "", err.Error()
	}
	wasRunning := rec.State != machine.Stopped && rec.State != machine.Failed && rec.State != machine.Created
	if wasRunning {
		if err := ms.Stop(ctx, rec.ID); err != nil && !errors.Is(err, errdefs.ErrConflict) {
			return "", "stopping it: " + err.Error()
		}
		if err := ms.Wait(ctx, rec.ID, machine.Stopped, drainStopWait); err != nil {
			return "", "stopping it: " + err.Error()
		}
	}
	if err := c.cfg.Store.MoveMachine(ctx, rec.ID, to); err != nil {
		return "", err.Error()
	}
	if c.cfg.Net != nil {
		c.cfg.Net.Detach(ctx, rec.ID)
	}
	c.cfg.Store.Note(ctx, rec.ID, machine.Event{Type: string(machine.EvMoved), Source: machine.SourceKiln, Message: fmt.Sprintf("drained from host %s to host %s", c.cfg.Here.Name, to)})
	if wasRunning {
		// The new host claims it.
		if err := ms.Start(ctx, rec.ID); err != nil {
			c.logf("machine %s: starting it on host %s: %v", rec.ID, to, err)
		}
	}
	return to, ""
}

// claimGrace keeps claims apart from starts made on this host, which launch at once: a
// machine starting here for less than this is its starter's.
const claimGrace = 2 * time.Second

// Claim starts the machines other hosts placed here: those starting on this host for
// longer than the grace that no supervisor here runs yet.
func (c *Cluster) Claim(ctx context.Context, cl Claimer) {
	if !c.cfg.Shared {
		return
	}
	recs, err := c.cfg.Store.MachinesOnHost(ctx, c.cfg.Here.Name)
	if err != nil {
		return
	}
	now := c.cfg.Now()
	for _, rec := range recs {
		if rec.State != machine.Starting || now.Sub(rec.UpdatedAt) < claimGrace {
			continue
		}
		if cl.Claim(rec.ID) {
			c.logf("machine %s was placed on this host: starting it", rec.ID)
		}
	}
}

// ClaimEvery runs Claim every second until ctx ends.
func (c *Cluster) ClaimEvery(ctx context.Context, cl Claimer) {
	if !c.cfg.Shared {
		return
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.Claim(ctx, cl)
		}
	}
}
