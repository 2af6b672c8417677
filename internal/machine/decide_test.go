package machine

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// follow decides in from s and follows every Continue, as a supervisor does, returning
// the states passed through, the events recorded and the effects asked for.
func follow(t *testing.T, s State, in Input, f Facts) (states []State, events []string, effects []Effect, err error) {
	t.Helper()
	for i := 0; ; i++ {
		if i > 10 {
			t.Fatal("decisions do not settle")
		}
		d, err := Decide(s, in, f)
		if err != nil {
			return states, events, effects, err
		}
		if d.Next != s {
			if !CanTransition(s, d.Next) {
				t.Fatalf("%s → %s breaks the table", s, d.Next)
			}
			states = append(states, d.Next)
		}
		if d.Event.Type != "" {
			events = append(events, d.Event.Source+":"+d.Event.Type)
		}
		for _, e := range d.Effects {
			if e != Continue {
				effects = append(effects, e)
			}
		}
		if !d.Has(Continue) {
			return states, events, effects, nil
		}
		s, in = d.Next, d.Then
	}
}

func code(c int) *int { return &c }

func TestDecide(t *testing.T) {
	always := RestartPolicy{Policy: "always"}
	onFailure := RestartPolicy{Policy: "on-failure", MaxRetries: 2}
	for _, tc := range []struct {
		name   string
		from   State
		in     Input
		f      Facts
		states string // the states passed through, space-separated
		events string
		effect string
		err    error
	}{
		{"start a created machine", Created, InStart, Facts{}, "starting", "user:start", "launch", nil},
		{"start a stopped machine", Stopped, InStart, Facts{}, "starting", "user:start", "launch", nil},
		{"start a failed machine", Failed, InStart, Facts{}, "starting", "user:start", "launch", nil},
		{"resume a suspended machine", Suspended, InStart, Facts{}, "starting", "user:start", "launch", nil},
		{"start a started machine", Started, InStart, Facts{}, "", "", "", errdefs.ErrConflict},
		{"booted", Starting, InBooted, Facts{}, "started", "kiln:start", "", nil},
		{"resumed", Starting, InResumed, Facts{}, "started", "kiln:resume", "", nil},
		{"booted after a stop came", Stopping, InBooted, Facts{}, "", "", "", errdefs.ErrConflict},
		{"boot failed", Starting, InBootFailed, Facts{}, "failed", "kiln:start", "", nil},
		{"resume failed: cold boot", Starting, InResumeFailed, Facts{}, "", "kiln:resume-failed-cold-boot", "boot-cold", nil},
		{"capacity timeout", Starting, InCapacityTimeout, Facts{}, "failed", "kiln:capacity", "", nil},
		{"stop a started machine", Started, InStop, Facts{Supervised: true}, "stopping", "user:stop", "halt", nil},
		{"stop while waiting for room", Starting, InStop, Facts{Supervised: true}, "stopping", "user:stop", "halt", nil},
		{"stop a machine nothing runs", Started, InStop, Facts{}, "stopping stopped", "user:stop kiln:stop", "discard-saved", nil},
		{"stop a suspended machine", Suspended, InStop, Facts{Saved: true}, "stopping stopped", "user:stop kiln:stop", "discard-saved", nil},
		{"stop a stopped machine", Stopped, InStop, Facts{}, "", "", "", errdefs.ErrConflict},
		{"a stopped VM is down", Stopping, InVMDown, Facts{ExitCode: code(0)}, "stopped", "kiln:stop", "discard-saved", nil},
		{"a user's stop never restarts", Stopping, InVMDown, Facts{Restart: always}, "stopped", "kiln:stop", "discard-saved", nil},
		{"exit, no policy", Started, InExited, Facts{Exited: true, ExitCode: code(0)}, "stopping stopped", "kiln:exit kiln:stop", "power-off discard-saved", nil},
		{"exit, always", Started, InExited, Facts{Exited: true, ExitCode: code(0), Restart: always}, "stopping stopped starting", "kiln:exit kiln:stop kiln:restart", "power-off discard-saved launch", nil},
		{"exit 1, on-failure", Started, InExited, Facts{Exited: true, ExitCode: code(1), Restart: onFailure, Retries: 1}, "stopping stopped starting", "kiln:exit kiln:stop kiln:restart", "power-off discard-saved launch", nil},
		{"exit 1, on-failure retries spent", Started, InExited, Facts{Exited: true, ExitCode: code(1), Restart: onFailure, Retries: 2}, "stopping stopped", "kiln:exit kiln:stop", "power-off discard-saved", nil},
		{"exit 0, on-failure", Started, InExited, Facts{Exited: true, ExitCode: code(0), Restart: onFailure}, "stopping stopped", "kiln:exit kiln:stop", "power-off discard-saved", nil},
		{"exit, auto_destroy", Started, InExited, Facts{Exited: true, ExitCode: code(0), AutoDestroy: true}, "stopping stopped destroying destroyed", "kiln:exit kiln:stop user:destroy kiln:destroy", "power-off discard-saved discard-saved remove", nil},
		{"VM gone after a restart, always", Started, InVMGone, Facts{Exited: true, Restart: always}, "stopping stopped starting", "kiln:exit kiln:stop kiln:restart", "power-off discard-saved launch", nil},
		{"VM gone after a restart, no policy", Started, InVMGone, Facts{Exited: true}, "stopping stopped", "kiln:exit kiln:stop", "power-off discard-saved", nil},
		{"VM gone while stopping", Stopping, InVMDown, Facts{}, "stopped", "kiln:stop", "discard-saved", nil},
		{"suspend", Started, InSuspend, Facts{Supervised: true}, "suspending", "user:suspend", "save", nil},
		{"suspend a machine nothing runs", Started, InSuspend, Facts{}, "suspending stopped", "user:suspend kiln:suspend-failed", "power-off discard-saved", nil},
		{"saved", Suspending, InSaved, Facts{}, "suspended", "kiln:suspend", "", nil},
		{"save failed", Suspending, InSaveFailed, Facts{}, "stopped", "kiln:suspend-failed", "power-off discard-saved", nil},
		{"suspend a stopped machine", Stopped, InSuspend, Facts{}, "", "", "", errdefs.ErrConflict},
		{"destroy a stopped machine", Stopped, InDestroy, Facts{}, "destroying destroyed", "user:destroy kiln:destroy", "discard-saved remove", nil},
		{"destroy a suspended machine", Suspended, InDestroy, Facts{Saved: true}, "destroying destroyed", "user:destroy kiln:destroy", "discard-saved remove", nil},
		{"destroy a started machine", Started, InDestroy, Facts{}, "", "", "", errdefs.ErrConflict},
		{"destroy a destroyed machine", Destroyed, InDestroy, Facts{}, "", "", "", errdefs.ErrNotFound},
		{"finish a destroy a crash cut short", Destroying, InRemoved, Facts{}, "destroyed", "kiln:destroy", "", nil},
		{"supervisor ended while started", Started, InNoSupervisor, Facts{Restart: always}, "stopping stopped", "kiln:stop kiln:stop", "discard-saved", nil},
		{"supervisor ended while starting", Starting, InNoSupervisor, Facts{}, "failed", "kiln:start", "", nil},
		{"supervisor ended while suspending", Suspending, InNoSupervisor, Facts{}, "stopped", "kiln:suspend-failed", "", nil},
		{"supervisor ended while stopped", Stopped, InNoSupervisor, Facts{}, "", "", "", nil},
		{"unknown input", Started, Input("jump"), Facts{}, "", "", "", errdefs.ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			states, events, effects, err := follow(t, tc.from, tc.in, tc.f)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := fmt.Sprint(strings.Join(stateNames(states), " "), "|", strings.Join(events, " "), "|", effectNames(effects))
			want := tc.states + "|" + tc.events + "|" + tc.effect
			if got != want {
				t.Fatalf("from %s on %s:\n got %s\nwant %s", tc.from, tc.in, got, want)
			}
		})
	}
}

// The exit code travels with the exit and the stop that follows it, as Fly reports it.
func TestDecideKeepsExitCode(t *testing.T) {
	d, err := Decide(Started, InExited, Facts{Exited: true, ExitCode: code(3)})
	if err != nil || d.Event.ExitCode == nil || *d.Event.ExitCode != 3 {
		t.Fatalf("exit event %+v, %v", d.Event, err)
	}
	d, err = Decide(d.Next, d.Then, Facts{Exited: true, ExitCode: code(3)})
	if err != nil || d.Event.ExitCode == nil || *d.Event.ExitCode != 3 {
		t.Fatalf("stop event %+v, %v", d.Event, err)
	}
}

// Every state answers every input with a decision or a classified error: no input
// leaves a state in limbo or breaks the table.
func TestDecideIsTotal(t *testing.T) {
	inputs := []Input{InStart, InStop, InSuspend, InDestroy, InBooted, InResumed, InResumeFailed, InBootFailed,
		InCapacityTimeout, InExited, InVMGone, InVMDown, InSaved, InSaveFailed, InNoSupervisor, InRemoved, InRestart}
	for _, s := range States {
		for _, in := range inputs {
			for _, f := range []Facts{{}, {Supervised: true, Exited: true, Restart: RestartPolicy{Policy: "always"}}} {
				d, err := Decide(s, in, f)
				if err != nil {
					if errdefs.KindOf(err) == nil {
						t.Errorf("%s on %s: unclassified error %v", s, in, err)
					}
					continue
				}
				if d.Next != s && !CanTransition(s, d.Next) {
					t.Errorf("%s on %s → %s breaks the table", s, in, d.Next)
				}
				if d.Next != s && d.Event.Type == "" {
					t.Errorf("%s on %s → %s records no event", s, in, d.Next)
				}
			}
		}
	}
}

func stateNames(ss []State) []string {
	var out []string
	for _, s := range ss {
		out = append(out, string(s))
	}
	return out
}

func effectNames(es []Effect) string {
	var out []string
	for _, e := range es {
		out = append(out, string(e))
	}
	return strings.Join(out, " ")
}
