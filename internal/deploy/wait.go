package deploy

import (
	"context"
	"fmt"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/machine"
)

// checkFailed is a machine that did not become healthy in time: the deploy rolls back.
type checkFailed struct {
	id    string
	after time.Duration
	why   string
}

func (c *checkFailed) Error() string {
	return fmt.Sprintf("machine %s was not healthy after %s: %s", c.id, c.after, c.why)
}

// drained waits, up to Drain, until the proxy has the machine out of service with no
// request in flight.
func (e *Engine) drained(ctx context.Context, id string) {
	limit := e.Drain
	if limit <= 0 {
		limit = DefaultDrain
	}
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		h := e.health(id)
		if !h.Known || (h.Cordoned && h.Inflight == 0) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(e.poll() / 4):
		}
	}
}

func (e *Engine) health(id string) HealthState {
	if e.Health == nil {
		return HealthState{}
	}
	return e.Health.Health(id)
}

// downFor is how long a machine may stay stopped or failed while a deploy waits for it:
// a restart policy brings a crashed workload back within it.
const downFor = 5 * time.Second

// healthy waits until a machine runs a start later than since and, if its services
// have checks, the proxy has seen them pass on that run.
func (e *Engine) healthy(ctx context.Context, id string, cfg api.MachineConfig, since time.Time, wait time.Duration) error {
	// Checks are run by the proxy: a server without one (--proxy-listen off) waits
	// for the machine to start.
	checks := false
	for _, s := range cfg.Services {
		checks = checks || len(s.Checks) > 0 && e.Health != nil
	}
	start := time.Now()
	why := "it did not start"
	var downSince time.Time
	for {
		m, err := e.Machines.Get(ctx, id)
		if err != nil {
			return err
		}
		switch {
		case m.State == machine.Started && !checks:
			return nil
		case m.State == machine.Started:
			h := e.health(id)
			switch {
			case h.StartedAt.IsZero() || h.StartedAt.Before(since):
				why = "its checks have not run yet"
			case h.Rounds == 0:
				why = "its checks have not run yet"
			case h.Passing:
				return nil
			default:
				why = "its health checks fail"
			}
		case m.State == machine.Stopped && m.ExitCode != nil:
			why = fmt.Sprintf("its workload exited with code %d (kiln logs %s)", *m.ExitCode, id)
		case m.State == machine.Failed:
			why = "it failed to start"
		}
		// A machine that stays down is not coming back (its restart policy gave up):
		// no point waiting out the timeout.
		if down := m.State == machine.Stopped || m.State == machine.Failed || m.State == machine.Destroyed; !down {
			downSince = time.Time{}
		} else if downSince.IsZero() {
			downSince = time.Now()
		} else if time.Since(downSince) >= downFor {
			return &checkFailed{id: id, after: time.Since(start).Round(time.Second), why: why}
		}
		if time.Since(start) >= wait {
			return &checkFailed{id: id, after: wait, why: why}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(e.poll()):
		}
	}
}
