package machine

import (
	"errors"
	"testing"

	"github.com/kilnhq/kiln/internal/errdefs"
)

func TestTable(t *testing.T) {
	for _, s := range States {
		if !s.Valid() {
			t.Errorf("%s not in the table", s)
		}
		for _, to := range transitions[s] {
			if !to.Valid() {
				t.Errorf("%s → unknown %s", s, to)
			}
		}
	}
	if len(transitions[Destroyed]) != 0 || !Destroyed.Terminal() {
		t.Error("destroyed must be terminal")
	}
	// Every state but created is reachable, and destroyed is reachable from every state.
	reach := map[State]bool{Created: true}
	for changed := true; changed; {
		changed = false
		for from := range reach {
			for _, to := range transitions[from] {
				if !reach[to] {
					reach[to], changed = true, true
				}
			}
		}
	}
	for _, s := range States {
		if !reach[s] {
			t.Errorf("%s unreachable from created", s)
		}
	}
}

func TestNext(t *testing.T) {
	for _, tc := range []struct {
		from State
		a    Action
		want State
		kind error
	}{
		{Created, ActionStart, Starting, nil},
		{Stopped, ActionStart, Starting, nil},
		{Suspended, ActionStart, Starting, nil},
		{Started, ActionStop, Stopping, nil},
		{Started, ActionSuspend, Suspending, nil},
		{Stopped, ActionDestroy, Destroying, nil},
		{Started, ActionStart, "", errdefs.ErrConflict},
		{Stopped, ActionStop, "", errdefs.ErrConflict},
		{Destroyed, ActionStart, "", errdefs.ErrConflict},
		{Started, "explode", "", errdefs.ErrInvalid},
	} {
		got, err := Next(tc.from, tc.a)
		if got != tc.want || (tc.kind == nil) != (err == nil) || (tc.kind != nil && !errors.Is(err, tc.kind)) {
			t.Errorf("Next(%s, %s) = %s, %v", tc.from, tc.a, got, err)
		}
	}
	if err := CheckTransition(Stopped, Started); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("stopped → started skips starting: %v", err)
	}
}

func TestRestartPolicy(t *testing.T) {
	for _, tc := range []struct {
		p             RestartPolicy
		code, retries int
		want          bool
	}{
		{RestartPolicy{Policy: "no"}, 1, 0, false},
		{RestartPolicy{Policy: "always"}, 0, 50, true},
		{RestartPolicy{Policy: "on-failure", MaxRetries: 3}, 1, 2, true},
		{RestartPolicy{Policy: "on-failure", MaxRetries: 3}, 1, 3, false},
		{RestartPolicy{Policy: "on-failure", MaxRetries: 3}, 0, 0, false},
		{RestartPolicy{Policy: "on-failure"}, 2, 9, true},
		{RestartPolicy{Policy: "on-failure"}, 2, 10, false},
	} {
		if got := tc.p.ShouldRestart(tc.code, tc.retries); got != tc.want {
			t.Errorf("%+v exit %d after %d retries: %v", tc.p, tc.code, tc.retries, got)
		}
	}
	if err := (RestartPolicy{Policy: "sometimes"}).Validate(); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("bad policy: %v", err)
	}
}
