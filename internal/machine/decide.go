package machine

import "github.com/kilnhq/kiln/internal/errdefs"

// EventType names an entry of a machine's journal. The names are Fly's where Fly has
// one; API clients read them.
type EventType string

const (
	EvLaunch  EventType = "launch"  // created
	EvStart   EventType = "start"   // asked to start; or its VM booted
	EvResume  EventType = "resume"  // its saved VM runs again
	EvStop    EventType = "stop"    // asked to stop; or its VM is down
	EvExit    EventType = "exit"    // its workload exited (or its VM was found gone)
	EvRestart EventType = "restart" // started again by its restart policy
	EvSuspend EventType = "suspend" // asked to suspend; or its VM is saved
	EvDestroy EventType = "destroy" // asked to destroy; or it is gone
	EvUpdate  EventType = "update"  // its config changed
	// EvCapacity: it waited for room longer than the capacity wait.
	EvCapacity EventType = "capacity"
	// EvCapacityQueued notes its place in the capacity queue.
	EvCapacityQueued EventType = "capacity-queued"
	// EvSuspendFailed: saving its VM failed, so it was stopped instead.
	EvSuspendFailed EventType = "suspend-failed"
	// EvResumeFailed notes that its saved VM could not run again, so it boots cold.
	EvResumeFailed EventType = "resume-failed-cold-boot"
	// EvMoved notes that a drain gave it to another host.
	EvMoved EventType = "moved"
)

// Source says who caused an event.
const (
	SourceUser = "user"
	SourceKiln = "kiln"
)

// Input is what happens to a machine: a user's request or something its supervisor saw.
type Input string

const (
	// Users' requests.
	InStart   Input = "start"
	InStop    Input = "stop"
	InSuspend Input = "suspend"
	InDestroy Input = "destroy"

	// What supervision sees.
	InBooted          Input = "booted"           // the VM is up and the workload spawned
	InResumed         Input = "resumed"          // the saved VM runs again
	InResumeFailed    Input = "resume-failed"    // the saved VM cannot run: boot cold
	InBootFailed      Input = "boot-failed"      // the VM or the workload did not start
	InCapacityTimeout Input = "capacity-timeout" // no room came within the wait
	InExited          Input = "exited"           // the workload exited (exit code, if known)
	InVMGone          Input = "vm-gone"          // after a restart: a started machine has no VM
	InVMDown          Input = "vm-down"          // the VM is powered off, after an exit or a stop
	InSaved           Input = "saved"            // the VM is saved to disk
	InSaveFailed      Input = "save-failed"      // saving the VM failed
	InNoSupervisor    Input = "no-supervisor"    // nothing runs the machine any more
	InRemoved         Input = "removed"          // a destroy's clean-up is done
)

// Facts are what a decision may depend on besides the state and the input.
type Facts struct {
	ExitCode *int // InExited
	// Exited says the VM goes down because the workload exited (or the VM was found
	// gone), not on request: only then may the restart policy or auto_destroy act.
	Exited bool
	// Retries is how many times the restart policy restarted the workload already.
	Retries     int
	Restart     RestartPolicy
	AutoDestroy bool
	// Supervised says a supervisor runs the machine's VM (or its wait for room) now.
	Supervised bool
	// Saved says a suspended machine's VM is saved on this host.
	Saved bool
	// Message explains the first event recorded (why a boot failed, say).
	Message string
}

// Effect is work a decision asks of the machine's supervisor.
type Effect string

const (
	// Launch starts supervision: wait for room, resume the saved VM or boot, run.
	Launch Effect = "launch"
	// Halt asks the supervisor to stop the workload (signal, grace) and power off.
	Halt Effect = "halt"
	// Save asks the supervisor to save the VM (suspend).
	Save Effect = "save"
	// PowerOff powers the VM off.
	PowerOff Effect = "power-off"
	// BootCold discards the saved VM and boots.
	BootCold Effect = "boot-cold"
	// DiscardSaved removes a suspended machine's saved VM.
	DiscardSaved Effect = "discard-saved"
	// Remove lets go of what the machine holds: volumes, logs, network.
	Remove Effect = "remove"
	// Continue makes the caller decide again, on Then, from the new state.
	Continue Effect = "continue"
)

// Decision is what follows an input: the state to move to (the same state for a note
// that changes none), the event to record, and the work to do.
type Decision struct {
	Next    State
	Event   Event
	Effects []Effect
	// Then is the input to decide next, from Next, when Effects has Continue: a step
	// that passes through more than one state (exit → stopping, then stopped, then a
	// restart) takes one transition at a time, each recorded.
	Then Input
}

// Has says whether the decision asks for e.
func (d Decision) Has(e Effect) bool {
	for _, x := range d.Effects {
		if x == e {
			return true
		}
	}
	return false
}

// Changes says whether the decision moves the machine to another state.
func (d Decision) Changes(from State) bool { return d.Next != from }

func user(t EventType) Event { return Event{Type: string(t), Source: SourceUser} }
func kiln(t EventType) Event { return Event{Type: string(t), Source: SourceKiln} }

// Decide is the machine's one rulebook: from state s, on input in, given facts f, what
// state comes next, what is recorded, and what must be done. It changes nothing; the
// caller records the transition (the store compares and swaps) and then does the work.
// An input the state does not allow is ErrConflict, saying why.
func Decide(s State, in Input, f Facts) (Decision, error) {
	d := Decision{Next: s}
	conflict := func() (Decision, error) {
		return Decision{}, errdefs.New(errdefs.ErrConflict, "cannot %s a machine that is %s", in, s)
	}
	switch in {
	case InStart:
		if !CanTransition(s, Starting) {
			return conflict()
		}
		d.Next, d.Event, d.Effects = Starting, user(EvStart), []Effect{Launch}
	case InStop:
		if !CanTransition(s, Stopping) {
			return conflict()
		}
		d.Next, d.Event = Stopping, user(EvStop)
		if f.Supervised {
			d.Effects = []Effect{Halt}
		} else {
			// Nothing runs it (its VM is gone, or saved by a suspend, which a stop
			// discards): the stop completes at once.
			d.Effects, d.Then = []Effect{Continue}, InVMDown
		}
	case InSuspend:
		if !CanTransition(s, Suspending) {
			return conflict()
		}
		d.Next, d.Event = Suspending, user(EvSuspend)
		if f.Supervised {
			d.Effects = []Effect{Save}
		} else {
			d.Effects, d.Then = []Effect{Continue}, InSaveFailed
		}
	case InDestroy:
		if s == Destroyed {
			return Decision{}, errdefs.New(errdefs.ErrNotFound, "the machine is already destroyed")
		}
		if s == Started || s == Starting || !CanTransition(s, Destroying) {
			// A running machine is stopped first (destroy with force does that).
			return Decision{}, errdefs.New(errdefs.ErrConflict, "a machine that is %s cannot be destroyed: stop it first, or destroy with force=true", s)
		}
		d.Next, d.Event, d.Effects = Destroying, user(EvDestroy), []Effect{DiscardSaved, Remove, Continue}
		d.Then = InRemoved
	case InRemoved:
		if s != Destroying {
			return conflict()
		}
		d.Next, d.Event = Destroyed, kiln(EvDestroy)
	case InBooted, InResumed:
		if s != Starting {
			// Only a stop moves a starting machine elsewhere: the supervisor follows it.
			return conflict()
		}
		d.Next, d.Event = Started, kiln(EvStart)
		if in == InResumed {
			d.Event = kiln(EvResume)
		}
	case InResumeFailed:
		if s != Starting {
			return conflict()
		}
		d.Event, d.Effects = kiln(EvResumeFailed), []Effect{BootCold}
	case InBootFailed, InCapacityTimeout:
		if s != Starting {
			return conflict()
		}
		d.Next, d.Event = Failed, kiln(EvStart)
		if in == InCapacityTimeout {
			d.Event = kiln(EvCapacity)
		}
	case InExited, InVMGone:
		if s != Started {
			return conflict()
		}
		d.Next, d.Event = Stopping, kiln(EvExit)
		d.Event.ExitCode = f.ExitCode
		d.Effects, d.Then = []Effect{PowerOff, Continue}, InVMDown
	case InVMDown:
		switch s {
		case Started, Starting:
			// The VM went down under a machine that was not stopping (its supervisor
			// ended): it stops, through stopping.
			d.Next, d.Event = Stopping, kiln(EvStop)
			d.Effects, d.Then = []Effect{Continue}, InVMDown
		case Stopping:
			// A stopped machine has no saved VM either: its next start boots.
			d.Next, d.Event, d.Effects = Stopped, kiln(EvStop), []Effect{DiscardSaved}
			d.Event.ExitCode = f.ExitCode
			exit := -1
			if f.ExitCode != nil {
				exit = *f.ExitCode
			}
			// A stop the user asked for never restarts.
			switch {
			case f.Exited && f.Restart.ShouldRestart(exit, f.Retries):
				d.Effects, d.Then = append(d.Effects, Continue), InRestart
			case f.Exited && f.AutoDestroy:
				d.Effects, d.Then = append(d.Effects, Continue), InDestroy
			}
		default:
			return conflict()
		}
	case InRestart:
		if s != Stopped {
			return conflict()
		}
		d.Next, d.Event, d.Effects = Starting, kiln(EvRestart), []Effect{Launch}
	case InSaved:
		if s != Suspending {
			return conflict()
		}
		d.Next, d.Event = Suspended, kiln(EvSuspend)
	case InSaveFailed:
		if s != Suspending {
			return conflict()
		}
		d.Next, d.Event, d.Effects = Stopped, kiln(EvSuspendFailed), []Effect{PowerOff, DiscardSaved}
	case InNoSupervisor:
		// What a supervisor that ended left in between.
		switch s {
		case Started, Stopping:
			return Decide(s, InVMDown, Facts{})
		case Starting:
			d.Next, d.Event = Failed, kiln(EvStart)
		case Suspending:
			d.Next, d.Event = Stopped, kiln(EvSuspendFailed)
		}
	default:
		return Decision{}, errdefs.Invalid("unknown machine input %q", in)
	}
	if d.Next != s && !CanTransition(s, d.Next) {
		// The table is the law; a rule here that breaks it is a bug.
		return conflict()
	}
	return d, nil
}

// InRestart: the restart policy starts the workload again.
const InRestart Input = "restart"
