// Package machine holds what a machine is and how it may change: its states (Fly
// Machines' names), the one table of allowed transitions, the user actions that request
// them, and the restart policy's decision. It is pure: no I/O. The store applies a
// transition only if this table allows it, in the same transaction that records its
// event, so there is exactly one place where a machine's state changes.
package machine

import (
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// State is a machine's lifecycle state.
type State string

const (
	Created    State = "created"
	Starting   State = "starting"
	Started    State = "started"
	Stopping   State = "stopping"
	Stopped    State = "stopped"
	Suspending State = "suspending"
	Suspended  State = "suspended"
	Replacing  State = "replacing"
	Destroying State = "destroying"
	Destroyed  State = "destroyed"
	Failed     State = "failed"
)

// States lists every state, in lifecycle order.
var States = []State{Created, Starting, Started, Stopping, Stopped, Suspending, Suspended, Replacing, Destroying, Destroyed, Failed}

// transitions is the table: from → the states it may move to.
var transitions = map[State][]State{
	Created:    {Starting, Destroying, Failed},
	Starting:   {Started, Stopping, Failed},
	Started:    {Stopping, Suspending, Replacing, Destroying, Failed},
	Stopping:   {Stopped, Failed},
	Stopped:    {Starting, Replacing, Destroying},
	Suspending: {Suspended, Stopped, Failed},
	Suspended:  {Starting, Stopping, Destroying},
	Replacing:  {Starting, Stopped, Failed},
	Destroying: {Destroyed},
	Failed:     {Starting, Destroying},
	Destroyed:  nil,
}

// Valid reports whether s is a known state.
func (s State) Valid() bool {
	_, ok := transitions[s]
	return ok
}

// Terminal reports whether nothing can follow s.
func (s State) Terminal() bool { return s == Destroyed }

// CanTransition reports whether the table allows from → to.
func CanTransition(from, to State) bool {
	for _, t := range transitions[from] {
		if t == to {
			return true
		}
	}
	return false
}

// CheckTransition is CanTransition as an error a user can act on.
func CheckTransition(from, to State) error {
	if !from.Valid() || !to.Valid() {
		return errdefs.Invalid("unknown machine state %q → %q", from, to)
	}
	if !CanTransition(from, to) {
		return errdefs.New(errdefs.ErrConflict, "a machine in state %s cannot become %s", from, to)
	}
	return nil
}

// Action is what a user asks of a machine.
type Action string

const (
	ActionStart   Action = "start"
	ActionStop    Action = "stop"
	ActionSuspend Action = "suspend"
	ActionDestroy Action = "destroy"
)

// Next returns the state an action moves a machine in state s to first, or an error of
// kind ErrConflict saying why it cannot.
func Next(s State, a Action) (State, error) {
	var to State
	switch a {
	case ActionStart:
		to = Starting
	case ActionStop:
		to = Stopping
	case ActionSuspend:
		to = Suspending
	case ActionDestroy:
		to = Destroying
	default:
		return "", errdefs.Invalid("unknown action %q: use start, stop, suspend or destroy", a)
	}
	if !CanTransition(s, to) {
		return "", errdefs.New(errdefs.ErrConflict, "cannot %s a machine that is %s", a, s)
	}
	return to, nil
}

// Event is one entry of a machine's journal, as Fly reports them.
type Event struct {
	Type      string    `json:"type"`   // launch, start, stop, exit, restart, update, destroy
	Status    State     `json:"status"` // the state entered
	Source    string    `json:"source"` // user or kiln
	Timestamp time.Time `json:"timestamp"`
	ExitCode  *int      `json:"exit_code,omitempty"`
	// Message explains an event kiln caused, such as a wait for capacity.
	Message string `json:"message,omitempty"`
}

// RestartPolicy says whether kiln restarts a machine whose workload exited.
type RestartPolicy struct {
	Policy     string `json:"policy"` // no, always, on-failure
	MaxRetries int    `json:"max_retries,omitempty"`
}

// Validate checks the policy names and limits.
func (p RestartPolicy) Validate() error {
	switch p.Policy {
	case "", "no", "always", "on-failure":
	default:
		return errdefs.Invalid("restart.policy %q: use no, always or on-failure", p.Policy)
	}
	if p.MaxRetries < 0 {
		return errdefs.Invalid("restart.max_retries must not be negative")
	}
	return nil
}

// ShouldRestart decides, after the workload exited with exitCode and has been restarted
// retries times already, whether to start it again. max_retries bounds on-failure only;
// zero means Fly's default of 10.
func (p RestartPolicy) ShouldRestart(exitCode, retries int) bool {
	switch p.Policy {
	case "always":
		return true
	case "on-failure":
		max := p.MaxRetries
		if max == 0 {
			max = 10
		}
		return exitCode != 0 && retries < max
	}
	return false
}
