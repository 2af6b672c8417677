// Package supervisor runs machines' VMs on this host and turns what happens to them into
// inputs for machine.Decide: every state change a machine makes, whether a user asked
// for it or its VM did it, is decided there and recorded here, through the store's
// compare and swap, by one function (step). It is written against a small runtime port
// (Runtime, VM), so that every transition is tested with a fake runtime in the fast
// tier; the real adapter over vmrun lives in package machines.
//
// Crash recovery is the same supervision loop, started from what the store and the VM
// directory say (Recover).
package supervisor

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"path/filepath"
	"sync"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/reqid"
	"github.com/kilnhq/kiln/internal/serverlog"
	"github.com/kilnhq/kiln/internal/store"
)

// Store is what supervision needs of the store.
type Store interface {
	GetMachine(ctx context.Context, id string) (store.Machine, error)
	Transition(ctx context.Context, id string, from, to machine.State, ev machine.Event) error
	Note(ctx context.Context, id string, ev machine.Event) error
}

// Runtime boots and finds machines' VMs on this host.
type Runtime interface {
	// Boot boots the machine's VM from its config and spawns its workload. On error
	// nothing is left running.
	Boot(ctx context.Context, rec store.Machine, cfg api.MachineConfig) (VM, error)
	// Resume runs a suspended machine's saved VM again; nil, nil if none is saved. On
	// error the saved VM is gone and the machine boots cold.
	Resume(ctx context.Context, id string) (VM, error)
	// Saved says whether a machine's VM is saved on this host.
	Saved(id string) bool
	// Discard removes a machine's saved VM, if any.
	Discard(ctx context.Context, id string)
	// Owned lists the VMs on this host that belong to machines.
	Owned(ctx context.Context) ([]Owned, error)
	// Adopt takes over a running VM a previous kiln left; on error it is destroyed.
	Adopt(ctx context.Context, o Owned, rec store.Machine) (VM, error)
	// Restore keeps a saved VM a previous kiln left, ready for Resume; on error it is
	// destroyed.
	Restore(ctx context.Context, o Owned) error
	// DestroyOwned removes a VM no machine should have.
	DestroyOwned(ctx context.Context, o Owned)
}

// Owned is a VM on this host that belongs to a machine.
type Owned struct{ ID, Owner string }

// VM is one machine's VM, running its workload.
type VM interface {
	// Follow passes the workload's output, from offset, to add until the workload
	// exits (its exit code; nil if it died without one) or ctx ends.
	Follow(ctx context.Context, offset int64, add func(guest.Record) error) (exit *int, err error)
	// Signal sends sig to the workload.
	Signal(ctx context.Context, sig int) error
	// PowerOff stops the VM, giving the guest up to grace to shut down.
	PowerOff(ctx context.Context, grace time.Duration)
	// Save suspends the VM to disk; the runtime keeps it for Resume.
	Save(ctx context.Context) error
	// Release lets go of the VM without stopping it: the next kiln adopts it.
	Release()
	// Sync flushes the guest's filesystems to its disks (before a volume snapshot).
	Sync(ctx context.Context) error
	// Exec starts a command in the VM as given (the caller sets user and environment).
	Exec(ctx context.Context, req guest.ExecRequest, pio guest.IO) (*guest.Process, error)
	// As is how execs run: as the workload does (its user, environment and directory).
	As() guest.ExecRequest
	// Ps lists the processes in the guest, held to guest.ProcessStat's bounds.
	Ps(ctx context.Context) ([]guest.ProcessStat, error)
}

// Capacity holds room for running machines.
type Capacity interface {
	Reserve(ctx context.Context, id string, r capacity.Request, wait time.Duration, onQueued func(pos int, why error)) (string, error)
	Hold(id string, s capacity.Size)
	Release(id string)
}

// Config is what a Supervisor is made of.
type Config struct {
	Store   Store
	Runtime Runtime
	// Capacity, if set, holds room for every running machine; a start that finds none
	// waits up to CapacityWait in its queue, then fails saying what was short.
	Capacity     Capacity
	CapacityWait time.Duration
	// LogDir holds each machine's stored output (LogDir/ID).
	LogDir string
	// Remove lets go of what a destroyed machine holds besides its VM: volumes, stored
	// output, network. It must be safe to repeat.
	Remove func(ctx context.Context, id string) error
	Log    *slog.Logger
}

// Supervisor runs this host's machines. Close lets go of their VMs without stopping
// them.
type Supervisor struct {
	cfg    Config
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu   sync.Mutex
	runs map[string]*run
	// changed is closed, and replaced, whenever a machine's state changes here.
	changed chan struct{}
}

// New returns a supervisor; call Recover before the machines are used.
func New(cfg Config) *Supervisor {
	ctx, cancel := context.WithCancel(context.Background())
	return &Supervisor{cfg: cfg, ctx: ctx, cancel: cancel, runs: map[string]*run{}, changed: make(chan struct{})}
}

func (s *Supervisor) logf(format string, args ...any) {
	if s.cfg.Log != nil {
		s.cfg.Log.Info(fmt.Sprintf(format, args...))
	}
}

// logRun logs a line about a run's work, with the id of the API call it is for.
func (s *Supervisor) logRun(r *run, format string, args ...any) {
	if s.cfg.Log != nil {
		serverlog.For(r.ctx(s.ctx), s.cfg.Log).Info(fmt.Sprintf(format, args...))
	}
}

// LogDir is where a machine's output is stored.
func (s *Supervisor) LogDir(id string) string { return filepath.Join(s.cfg.LogDir, id) }

// Close stops supervising and lets go of every VM without stopping it: the next kiln
// adopts them.
func (s *Supervisor) Close() {
	s.cancel()
	s.wg.Wait()
}

// Request carries what a user's stop asks for.
type Request struct {
	// Signal, if set, goes to the workload first (else the config's stop signal);
	// Timeout is how long it has to exit (else the config's stop grace).
	Signal  int
	Timeout time.Duration
	// RequestID is the API call's: the work's log lines carry it.
	RequestID string
}

// Apply makes a user's request of a machine: it decides, records the transition and
// starts the work. It returns the state the machine is in once recorded; the work (a
// boot, a stop) goes on in the machine's supervisor. A request the state does not allow
// is ErrConflict.
func (s *Supervisor) Apply(ctx context.Context, id string, in machine.Input, req Request) (machine.State, error) {
	rec, err := s.cfg.Store.GetMachine(ctx, id)
	if err != nil {
		return "", err
	}
	cfg := machine.DecodeConfig(rec.Config)
	r := s.run(id)
	f := machine.Facts{Supervised: r != nil, Saved: s.cfg.Runtime.Saved(id),
		Restart: restartPolicy(cfg), AutoDestroy: cfg.AutoDestroy}
	req.RequestID = reqid.From(ctx)
	return s.step(ctx, id, rec.State, in, f, func(e machine.Effect) error {
		switch e {
		case machine.Launch:
			s.launch(ctx, id, nil)
		case machine.Halt:
			r.request(halt, req)
		case machine.Save:
			r.request(save, req)
		}
		return s.common(ctx, id, e)
	})
}

// common does the effects that are the same whoever decided them.
func (s *Supervisor) common(ctx context.Context, id string, e machine.Effect) error {
	switch e {
	case machine.DiscardSaved:
		s.cfg.Runtime.Discard(context.WithoutCancel(ctx), id)
	case machine.Remove:
		if s.cfg.Remove != nil {
			return s.cfg.Remove(context.WithoutCancel(ctx), id)
		}
	}
	return nil
}

// step decides in from state from, records each transition (and note) the decision
// makes, and has do carry out its effects, following Continue until the decisions
// settle. It is the only place where a machine's state changes.
func (s *Supervisor) step(ctx context.Context, id string, from machine.State, in machine.Input, f machine.Facts, do func(machine.Effect) error) (machine.State, error) {
	ctx = context.WithoutCancel(ctx) // a recorded transition's work is not left half done
	for {
		d, err := machine.Decide(from, in, f)
		if err != nil {
			return from, errdefs.Wrap(errdefs.KindOf(err), err, "machine %s", id)
		}
		if f.Message != "" {
			d.Event.Message, f.Message = f.Message, ""
		}
		if d.Changes(from) {
			if err := s.cfg.Store.Transition(ctx, id, from, d.Next, d.Event); err != nil {
				return from, err
			}
			s.notify()
		} else if d.Event.Type != "" {
			if err := s.cfg.Store.Note(ctx, id, d.Event); err != nil {
				s.logf("machine %s: recording %s: %v", id, d.Event.Type, err)
			}
		}
		for _, e := range d.Effects {
			if e == machine.Continue {
				continue
			}
			if err := do(e); err != nil {
				return d.Next, err
			}
		}
		if !d.Has(machine.Continue) {
			return d.Next, nil
		}
		from, in = d.Next, d.Then
	}
}

func restartPolicy(cfg api.MachineConfig) machine.RestartPolicy {
	return machine.RestartPolicy{Policy: cfg.Restart.Policy, MaxRetries: cfg.Restart.MaxRetries}
}

func (s *Supervisor) notify() {
	s.mu.Lock()
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
}

// Changed returns a channel closed at the next state change this supervisor records.
func (s *Supervisor) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

// Running returns the VM of a machine whose workload runs now; nil if none.
func (s *Supervisor) Running(id string) VM {
	r := s.run(id)
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.vm
}

// RunningVMs returns the VM of every machine whose workload runs now, by machine ID.
func (s *Supervisor) RunningVMs() map[string]VM {
	s.mu.Lock()
	runs := make(map[string]*run, len(s.runs))
	maps.Copy(runs, s.runs)
	s.mu.Unlock()
	out := map[string]VM{}
	for id, r := range runs {
		r.mu.Lock()
		if r.vm != nil {
			out[id] = r.vm
		}
		r.mu.Unlock()
	}
	return out
}

// Supervised says whether a supervisor runs the machine (its VM, or its wait for room).
func (s *Supervisor) Supervised(id string) bool { return s.run(id) != nil }

// Done returns a channel closed when the machine's supervisor has ended; nil if none
// runs.
func (s *Supervisor) Done(id string) <-chan struct{} {
	if r := s.run(id); r != nil {
		return r.done
	}
	return nil
}

// Hold keeps a machine from being started again by its restart policy and ends its
// supervisor (a destroy asks this of a machine between an exit and a restart).
func (s *Supervisor) Hold(id string) {
	if r := s.run(id); r != nil {
		r.request(halt, Request{})
	}
}

// Claim starts supervising a starting machine that no supervisor here runs (one that
// another host placed here); false if one runs already.
func (s *Supervisor) Claim(id string) bool {
	if s.run(id) != nil {
		return false
	}
	s.launch(s.ctx, id, nil)
	return true
}

func (s *Supervisor) run(id string) *run {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.runs[id]
}

// Record decides and records a user's request of a machine that another host runs:
// the transition only; that host does the work.
func (s *Supervisor) Record(ctx context.Context, id string, in machine.Input) error {
	rec, err := s.cfg.Store.GetMachine(ctx, id)
	if err != nil {
		return err
	}
	_, err = s.step(ctx, id, rec.State, in, machine.Facts{}, func(machine.Effect) error { return nil })
	return err
}
