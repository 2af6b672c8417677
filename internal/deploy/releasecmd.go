package deploy

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

// releaseCommand runs the release command in a temporary machine, as Fly makes it
// (appconfig.ReleaseMachineConfig), and destroys it once it exits; a non-zero exit stops
// the deploy before anything changes. A machine an earlier run of this deploy started
// (the server restarted meanwhile) is waited on, not started again: a migration must
// not run twice at once. A server that stops leaves it running.
func (e *Engine) releaseCommand(ctx context.Context, rel store.Release, spec Spec, cmd string) error {
	name := fmt.Sprintf("release-command-%d", rel.Version)
	id, err := e.releaseMachine(ctx, rel.App, name)
	if err != nil {
		return err
	}
	if id == "" {
		cfg, err := spec.Config.ReleaseMachineConfig(spec.Image)
		if err != nil {
			return err
		}
		cfg.Metadata[MetaSecrets] = strconv.Itoa(rel.SecretsVersion)
		m, err := e.Machines.Create(ctx, rel.App, api.CreateMachineRequest{Name: name, Config: cfg, SkipServiceRegistration: true})
		if err != nil {
			return fmt.Errorf("release_command: starting its machine: %w", err)
		}
		id = m.ID
	}
	limit := spec.Config.ReleaseCommandTimeout()
	start := time.Now()
	var m store.Machine
	for {
		if m, err = e.Machines.Get(ctx, id); err != nil {
			return err
		}
		if m.State == machine.Stopped || m.State == machine.Failed || m.State == machine.Destroyed {
			break
		}
		if time.Since(start) > limit {
			e.Machines.Destroy(context.WithoutCancel(ctx), id)
			return fmt.Errorf("release_command %q ran past release_command_timeout (%s) and was stopped; no machine of the app was changed", cmd, limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(e.poll()):
		}
	}
	e.Machines.Destroy(context.WithoutCancel(ctx), id)
	if m.ExitCode == nil || *m.ExitCode != 0 {
		code := "no exit code"
		if m.ExitCode != nil {
			code = "exit code " + strconv.Itoa(*m.ExitCode)
		}
		return fmt.Errorf("release_command %q failed (%s, machine %s: kiln logs %s); no machine of the app was changed", cmd, code, id, id)
	}
	return nil
}

// releaseMachine finds the release command's machine by its name; "" when none.
func (e *Engine) releaseMachine(ctx context.Context, app, name string) (string, error) {
	recs, _, err := e.Machines.List(ctx, app)
	if err != nil {
		return "", err
	}
	for _, r := range recs {
		if r.Name == name {
			return r.ID, nil
		}
	}
	return "", nil
}
