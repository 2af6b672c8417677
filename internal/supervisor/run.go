package supervisor

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machinelog"
	"github.com/kilnhq/kiln/internal/reqid"
	"github.com/kilnhq/kiln/internal/store"
)

// intent is what a user asked of a running machine's supervisor. It is not a copy of
// the state: the store has that. It is the work the recorded transition asked for (a
// stop, with its signal and grace; a save), which only the supervisor can do.
type intent int

const (
	none intent = iota
	halt
	save
)

// run is one machine's supervisor.
type run struct {
	mu     sync.Mutex
	vm     VM
	want   intent
	req    Request
	cancel context.CancelFunc // ends the wait for room, or the wait on the workload
	done   chan struct{}
	// again (guarded by the supervisor's mu) says a start was recorded while this run
	// was still ending: a new run follows it, and this one records nothing more.
	again   bool
	againID string // the id of the start that came meanwhile
	// reqID is the id of the API call the run's work is for (the start, or the stop or
	// suspend asked of it since): its log lines and its requests to the guest carry it.
	reqID string
}

func (r *run) request(w intent, req Request) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.want == none {
		r.want, r.req = w, req
		if req.RequestID != "" {
			r.reqID = req.RequestID
		}
	}
	if r.cancel != nil {
		r.cancel()
	}
}

func (r *run) intent() (intent, Request) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.want, r.req
}

// waitCtx is a context that a request ends, for one wait.
func (r *run) waitCtx(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(parent)
	r.mu.Lock()
	r.cancel = cancel
	if r.want != none {
		cancel()
	}
	r.mu.Unlock()
	return ctx, cancel
}

// ctx is parent carrying the id of the API call the run's work is for.
func (r *run) ctx(parent context.Context) context.Context {
	r.mu.Lock()
	defer r.mu.Unlock()
	return reqid.With(parent, r.reqID)
}

func (r *run) setVM(vm VM) {
	r.mu.Lock()
	r.vm = vm
	r.mu.Unlock()
}

// launch starts supervising a machine; vm is its running VM when adopted. A start
// recorded while the machine's last run is still ending is not lost: that run hands
// over to a new one when it has ended.
func (s *Supervisor) launch(ctx context.Context, id string, vm VM) {
	r := &run{done: make(chan struct{}), vm: vm, reqID: reqid.From(ctx)}
	s.mu.Lock()
	if old := s.runs[id]; old != nil {
		old.again, old.againID = true, r.reqID
		s.mu.Unlock()
		return
	}
	s.runs[id] = r
	s.mu.Unlock()
	s.wg.Add(1)
	go s.runLoop(id, r, vm)
}

// runLoop is one run's goroutine: supervise, then let go of the machine's room and of
// its place in the map, then settle what it left (or hand over to the start that came
// meanwhile).
func (s *Supervisor) runLoop(id string, r *run, vm VM) {
	defer s.wg.Done()
	defer close(r.done)
	s.supervise(id, r, vm)
	if s.cfg.Capacity != nil {
		s.cfg.Capacity.Release(id)
	}
	s.mu.Lock()
	again := r.again && s.ctx.Err() == nil
	if again {
		next := &run{done: make(chan struct{}), reqID: r.againID}
		s.runs[id] = next
		s.wg.Add(1)
		go s.runLoop(id, next, nil)
	} else {
		delete(s.runs, id)
	}
	s.mu.Unlock()
	if !again {
		// After the run is gone from the map, a user's request either saw it (and its
		// transition is settled here) or did not (and completed itself).
		s.settle(id)
	}
}

// replaced says a start came while the run was ending: it must record nothing more.
func (s *Supervisor) replaced(r *run) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return r.again
}

// settle finishes what a supervisor that has ended left in between: a stop it did not
// see through, or a start it never finished.
func (s *Supervisor) settle(id string) {
	if s.ctx.Err() != nil {
		return // kiln is shutting down: the next one recovers the machine
	}
	rec, err := s.cfg.Store.GetMachine(s.ctx, id)
	if err != nil {
		return
	}
	if _, err := s.step(s.ctx, id, rec.State, machine.InNoSupervisor, machine.Facts{}, s.noEffects(id)); err != nil {
		s.logf("machine %s: settling after its supervisor ended: %v", id, err)
	}
}

// noEffects carries out the effects that need no VM.
func (s *Supervisor) noEffects(id string) func(machine.Effect) error {
	return func(e machine.Effect) error { return s.common(s.ctx, id, e) }
}

func size(cfg api.MachineConfig) capacity.Size {
	return capacity.Size{CPUs: cfg.Guest.CPUs, MemoryMiB: cfg.Guest.MemoryMB}
}

// supervise runs one machine until it stops for good: wait for room, resume or boot,
// follow the workload, record its exit, restart by policy. A transition it cannot make
// means a user changed the machine meanwhile (a stop): it follows the user.
func (s *Supervisor) supervise(id string, r *run, vm VM) {
	retries := 0
	if vm != nil && s.cfg.Capacity != nil {
		// An adopted VM holds its room whatever the ledger would say now.
		if rec, err := s.cfg.Store.GetMachine(s.ctx, id); err == nil {
			s.cfg.Capacity.Hold(id, size(machine.DecodeConfig(rec.Config)))
		}
	}
	for {
		rec, logs, err := s.prepare(id)
		if err != nil {
			switch {
			case vm == nil:
			case s.ctx.Err() != nil:
				vm.Release() // kiln is shutting down: the next kiln adopts the VM
			default:
				// Not a VM kiln can follow: it must not run on unwatched (a later start
				// would boot a second one on its volumes).
				s.logRun(r, "machine %s: %v; stopping its VM", id, err)
				vm.PowerOff(context.WithoutCancel(s.ctx), machine.DefaultStopGrace)
			}
			return
		}
		if vm == nil && rec.State != machine.Starting {
			// A stop got in before this run did: nothing to start.
			logs.Close()
			return
		}
		cfg := machine.DecodeConfig(rec.Config)
		offset := logs.Offset()
		if vm == nil {
			var fresh bool
			if vm, fresh = s.start(id, r, rec, cfg); vm == nil {
				logs.Close()
				return
			}
			if fresh {
				offset = 0
				logs.Reset()
			}
		}
		r.setVM(vm)
		wctx, cancel := r.waitCtx(s.ctx)
		exit, ferr := s.follow(wctx, id, vm, offset, logs)
		cancel()
		want, req := r.intent()
		if s.ctx.Err() == nil && want == save {
			logs.Close()
			// While its VM is saved nothing else uses it (an exec, a scrape of its
			// agent): the save closes the agent's connection.
			r.setVM(nil)
			s.save(id, r, vm, cfg)
			return
		}
		if s.ctx.Err() == nil && want == halt {
			if code, ok := s.signalAndWait(id, vm, cfg, req, logs); ok {
				exit, ferr = code, nil
			}
		}
		logs.Flush()
		logs.Close()
		if s.ctx.Err() != nil {
			vm.Release() // kiln is shutting down: the next kiln adopts the VM
			return
		}
		if ferr != nil && want == none {
			s.logRun(r, "machine %s: lost its workload: %v", id, ferr)
		}
		r.setVM(nil)
		restart, off := false, false
		do := func(e machine.Effect) error {
			switch e {
			case machine.PowerOff:
				vm.PowerOff(context.WithoutCancel(s.ctx), machine.StopGrace(cfg))
				off = true
			case machine.Launch:
				restart = true
			}
			return s.common(s.ctx, id, e)
		}
		if want == none {
			f := machine.Facts{Exited: true, ExitCode: exit, Retries: retries, Restart: restartPolicy(cfg), AutoDestroy: cfg.AutoDestroy}
			if _, err := s.step(s.ctx, id, machine.Started, machine.InExited, f, do); err == nil {
				if !restart {
					return
				}
				if want, _ := r.intent(); want != none {
					return // a destroy holds it: settle stops it
				}
				retries++
				vm = nil
				continue
			}
			// A user's stop came in between: it is followed below.
		}
		if !off {
			vm.PowerOff(context.WithoutCancel(s.ctx), machine.StopGrace(cfg))
		}
		if !s.replaced(r) {
			s.stopped(id, r, exit)
		}
		return
	}
}

// stopped records that a machine the user stopped is down.
func (s *Supervisor) stopped(id string, r *run, exit *int) {
	rec, err := s.cfg.Store.GetMachine(s.ctx, id)
	if err != nil {
		return
	}
	if _, err := s.step(s.ctx, id, rec.State, machine.InVMDown, machine.Facts{ExitCode: exit}, s.noEffects(id)); err != nil {
		s.logRun(r, "machine %s: recording its stop: %v", id, err)
	}
}

// start holds room for a starting machine, then resumes its saved VM or boots it. It
// records the outcome; nil means the machine is not running (failed, or stopped
// meanwhile). fresh says the VM was booted, not resumed: its output starts again.
func (s *Supervisor) start(id string, r *run, rec store.Machine, cfg api.MachineConfig) (vm VM, fresh bool) {
	// A stop while the machine waits for room ends the wait.
	rctx, rcancel := r.waitCtx(s.ctx)
	err := s.reserve(rctx, id, r, cfg)
	rcancel()
	if want, _ := r.intent(); err == nil && want != none {
		err = context.Canceled
	}
	if err != nil {
		if want, _ := r.intent(); s.ctx.Err() != nil || want != none {
			return nil, false // settle completes the stop
		}
		s.logRun(r, "machine %s cannot start: %v", id, err)
		s.step(s.ctx, id, machine.Starting, machine.InCapacityTimeout, machine.Facts{Message: err.Error()}, s.noEffects(id))
		return nil, false
	}
	// A suspended machine's workload goes on where it was, log offset included.
	// The boot's requests to the guest (the workload's spawn) carry the call's id.
	ctx := r.ctx(s.ctx)
	vm, err = s.cfg.Runtime.Resume(ctx, id)
	if err != nil {
		s.logRun(r, "machine %s: resume failed, booting it cold: %v", id, err)
		s.step(s.ctx, id, machine.Starting, machine.InResumeFailed, machine.Facts{Message: err.Error()}, s.noEffects(id))
	}
	in := machine.InResumed
	if vm == nil {
		if vm, err = s.cfg.Runtime.Boot(ctx, rec, cfg); err != nil {
			if s.ctx.Err() != nil {
				return nil, false // kiln is shutting down: Recover starts it again
			}
			s.logRun(r, "machine %s failed to start: %v", id, err)
			s.step(s.ctx, id, machine.Starting, machine.InBootFailed, machine.Facts{Message: err.Error()}, s.noEffects(id))
			return nil, false // settle completes a stop that came meanwhile
		}
		in, fresh = machine.InBooted, true
	}
	r.setVM(vm) // ready for execs once the machine is recorded as started
	if _, err := s.step(s.ctx, id, machine.Starting, in, machine.Facts{}, s.noEffects(id)); err != nil {
		// Only a stop moves a starting machine elsewhere (and a start after it hands
		// over to a new run).
		r.request(halt, Request{})
	}
	return vm, fresh
}

// reserve holds room for the machine, waiting in the capacity queue (with its position
// in the events) when there is none.
func (s *Supervisor) reserve(ctx context.Context, id string, r *run, cfg api.MachineConfig) error {
	if s.cfg.Capacity == nil {
		return nil
	}
	_, err := s.cfg.Capacity.Reserve(ctx, id, capacity.Request{Size: size(cfg)}, s.cfg.CapacityWait, func(pos int, why error) {
		s.logRun(r, "machine %s waits for capacity (position %d): %v", id, pos, why)
		s.cfg.Store.Note(context.WithoutCancel(s.ctx), id, machine.Event{Type: string(machine.EvCapacityQueued), Source: machine.SourceKiln,
			Message: fmt.Sprintf("position %d in the capacity queue (waits up to %s): %v", pos, s.cfg.CapacityWait, why)})
	})
	return err
}

// follow stores the workload's output until it exits.
func (s *Supervisor) follow(ctx context.Context, id string, vm VM, offset int64, logs *machinelog.File) (*int, error) {
	return vm.Follow(ctx, offset, func(rec guest.Record) error {
		if err := logs.Add(rec); err != nil {
			// A full disk must not kill the machine; the output is lost, the workload not.
			s.logf("machine %s: storing output: %v", id, err)
		}
		return nil
	})
}

// signalAndWait gives the workload the stop signal (the request's, else the config's
// stop_config.signal) and up to the timeout to exit on its own, storing what it prints
// meanwhile. ok says it exited.
func (s *Supervisor) signalAndWait(id string, vm VM, cfg api.MachineConfig, req Request, logs *machinelog.File) (exit *int, ok bool) {
	sig, timeout := req.Signal, req.Timeout
	if sig == 0 {
		sig = machine.StopSignal(cfg)
	}
	if sig == 0 {
		return nil, false
	}
	if timeout == 0 {
		timeout = machine.StopGrace(cfg)
	}
	ctx, cancel := context.WithTimeout(reqid.With(context.WithoutCancel(s.ctx), req.RequestID), timeout)
	defer cancel()
	if err := vm.Signal(ctx, sig); err != nil {
		return nil, false
	}
	exit, err := s.follow(ctx, id, vm, logs.Offset(), logs)
	return exit, err == nil && exit != nil
}

// save saves a machine's VM; if that fails the machine is stopped instead, and its
// events say why.
func (s *Supervisor) save(id string, r *run, vm VM, cfg api.MachineConfig) {
	ctx := context.WithoutCancel(r.ctx(s.ctx))
	in, f := machine.InSaved, machine.Facts{}
	if err := vm.Save(ctx); err != nil {
		s.logRun(r, "machine %s: suspend failed, stopping it instead: %v", id, err)
		in, f.Message = machine.InSaveFailed, err.Error()
	}
	_, err := s.step(ctx, id, machine.Suspending, in, f, func(e machine.Effect) error {
		if e == machine.PowerOff {
			vm.PowerOff(ctx, machine.StopGrace(cfg))
		}
		return s.common(ctx, id, e)
	})
	if err != nil && in == machine.InSaved && !errors.Is(err, context.Canceled) {
		s.logRun(r, "machine %s: recording its suspend: %v", id, err)
	}
}

// prepare reads the machine and opens its log for one pass of its run, riding out a
// store or file system that fails for a moment (a run given up leaves a VM unwatched).
func (s *Supervisor) prepare(id string) (store.Machine, *machinelog.File, error) {
	var err error
	for try := 0; try < 10; try++ {
		if try > 0 {
			select {
			case <-s.ctx.Done():
				return store.Machine{}, nil, s.ctx.Err()
			case <-time.After(time.Second):
			}
		}
		var rec store.Machine
		if rec, err = s.cfg.Store.GetMachine(s.ctx, id); err != nil {
			if errors.Is(err, errdefs.ErrNotFound) || s.ctx.Err() != nil {
				return rec, nil, err
			}
			continue
		}
		var logs *machinelog.File
		if logs, err = machinelog.Open(s.LogDir(id)); err != nil {
			err = fmt.Errorf("its output cannot be stored: %w", err)
			continue
		}
		return rec, logs, nil
	}
	return store.Machine{}, nil, err
}
