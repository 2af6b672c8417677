package appconfig

import (
	"encoding/json"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"

	"github.com/google/shlex"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// MachineConfig is the desired config of the machines of one process group, running
// image. It is a pure function of the config: the same config gives byte-identical
// JSON. Defaults the server fills (guest from size, service protocol and autostart)
// are left to machine.Validate: run it on both sides before comparing with a stored
// config. The group's [[files]] become config.files; a local_path must have been
// inlined first (InlineLocalFiles).
func (c *Config) MachineConfig(group, image string) (api.MachineConfig, error) {
	if !c.hasGroup(group) {
		return api.MachineConfig{}, errdefs.New(errdefs.ErrNotFound, "process group %q is not in the app's config: its groups are %s", group, strings.Join(c.Groups(), ", "))
	}
	cfg, err := c.groupConfig(group)
	cfg.Image = image
	for _, f := range c.Files {
		if !c.appliesTo(f.Processes, group) {
			continue
		}
		af := api.File{GuestPath: f.GuestPath}
		switch {
		case f.LocalPath != "":
			// The file is on the deployer's side: kiln deploy reads it and sends it
			// (InlineLocalFiles); a config that still names it was not sent that way.
			return cfg, errdefs.Invalid("files: local_path %s was not sent with the deploy: kiln deploy reads it beside the config", f.LocalPath)
		case f.SecretName != "":
			af.SecretName = &f.SecretName
		default:
			af.RawValue = &f.RawValue
		}
		cfg.Files = append(cfg.Files, af)
	}
	return cfg, err
}

// groupConfig is a group's machine config without its image. Parse runs it for every
// group, so that a config that parses gives every group's machine config.
func (c *Config) groupConfig(group string) (api.MachineConfig, error) {
	cfg := api.MachineConfig{
		Env:      c.env(map[string]string{ProcessGroupEnv: group}),
		Metadata: map[string]string{ProcessGroupMetadata: group},
	}
	cfg.StopConfig = c.stopConfig()
	if err := c.setInit(&cfg.Init, c.Processes[group]); err != nil {
		return cfg, fmt.Errorf("processes.%s: %w", group, err)
	}
	setGuest(&cfg, c.vmFor(group), DefaultVMSize)
	for _, r := range c.Restart {
		if c.appliesTo(r.Processes, group) {
			cfg.Restart = api.Restart{Policy: restartPolicies[r.Policy], MaxRetries: r.Retries} // the last one wins, as in Fly
		}
	}
	for _, m := range c.Mounts {
		if c.appliesTo(m.Processes, group) {
			cfg.Mounts = append(cfg.Mounts, api.Mount{Volume: m.Source, Path: m.Destination})
		}
	}
	if s := c.HTTPService; s != nil && c.appliesTo(s.Processes, group) {
		svc := api.Service{
			Protocol:           "tcp",
			InternalPort:       s.InternalPort,
			Ports:              []api.ServicePort{{Port: 80, Handlers: []string{"http"}}},
			Autostop:           api.Autostop(s.AutoStopMachines),
			Autostart:          s.AutoStartMachines,
			MinMachinesRunning: s.MinMachinesRunning,
			Concurrency:        concurrency(s.Concurrency),
		}
		for _, hc := range s.Checks {
			svc.Checks = append(svc.Checks, httpCheck(hc, true))
		}
		cfg.Services = append(cfg.Services, svc)
	}
	for _, s := range c.Services {
		if !c.appliesTo(s.Processes, group) {
			continue
		}
		svc := api.Service{
			Protocol:           "tcp",
			InternalPort:       s.InternalPort,
			Autostop:           api.Autostop(s.AutoStopMachines),
			Autostart:          s.AutoStartMachines,
			MinMachinesRunning: s.MinMachinesRunning,
			Concurrency:        concurrency(s.Concurrency),
		}
		for _, p := range s.Ports {
			if !slices.Contains(p.Handlers, "tls") { // not served: see Config.Ignored
				svc.Ports = append(svc.Ports, api.ServicePort{Port: p.Port, Handlers: p.Handlers})
			}
		}
		for _, tc := range s.TCPChecks {
			svc.Checks = append(svc.Checks, tcpCheck(tc))
		}
		for _, hc := range s.HTTPChecks {
			svc.Checks = append(svc.Checks, httpCheck(hc, true))
		}
		cfg.Services = append(cfg.Services, svc)
	}
	return cfg, c.attachChecks(&cfg, group)
}

// attachChecks adds the group's top-level checks to the services whose internal port
// they check: kiln checks services' ports only.
func (c *Config) attachChecks(cfg *api.MachineConfig, group string) error {
	for _, name := range slices.Sorted(maps.Keys(c.Checks)) {
		ch := c.Checks[name]
		if !c.appliesTo(ch.Processes, group) {
			continue
		}
		port := ch.Port
		if port == 0 {
			// Fly checks the http_service's port when a check names none.
			if c.HTTPService == nil || !c.appliesTo(c.HTTPService.Processes, group) {
				return errdefs.Invalid("checks.%s has no port and process group %s has no http_service to take it from: set port", name, group)
			}
			port = c.HTTPService.InternalPort
		}
		check := httpCheck(ch.HTTPCheck, false)
		check.Type = ch.Type
		check.Port = jsonValue(ch.Port)
		if ch.Type == "tcp" {
			check.Path = ""
		}
		attached := false
		for i := range cfg.Services {
			if cfg.Services[i].InternalPort == port {
				cfg.Services[i].Checks = append(cfg.Services[i].Checks, check)
				attached = true
			}
		}
		if !attached {
			return errdefs.Invalid("checks.%s checks port %d, which is no service's internal_port in process group %s: kiln checks services' ports only: add a [[services]] with internal_port = %d for the group, or check a port it serves", name, port, group, port)
		}
	}
	return nil
}

// env is [env] with extra on top, as flyctl sets FLY_PROCESS_GROUP.
func (c *Config) env(extra map[string]string) map[string]string {
	env := make(map[string]string, len(c.Env)+len(extra))
	for k, v := range c.Env {
		env[k] = v
	}
	for k, v := range extra {
		env[k] = v
	}
	return env
}

// stopConfig is kill_signal and kill_timeout, with Fly's defaults (SIGINT, 5s) made
// explicit: a kiln machine without a stop config is powered off at once.
func (c *Config) stopConfig() *api.StopConfig {
	sc := &api.StopConfig{Signal: c.KillSignal, Timeout: api.Duration(c.KillTimeout)}
	if sc.Signal == "" {
		sc.Signal = DefaultKillSignal
	}
	if sc.Timeout == "" {
		sc.Timeout = DefaultKillTimeout
	}
	return sc
}

// setInit sets what the machine runs: the group's command (in place of the image's
// CMD, as Fly does), else [experimental] cmd; entrypoint and exec from [experimental].
func (c *Config) setInit(init *api.Init, command string) error {
	if command != "" {
		words, err := shlex.Split(command)
		if err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "%q: quote it as a shell would", command)
		}
		init.Cmd = words
	}
	if x := c.Experimental; x != nil {
		if init.Cmd == nil {
			init.Cmd = slices.Clone(x.Cmd)
		}
		init.Entrypoint = slices.Clone(x.Entrypoint)
		init.Exec = slices.Clone(x.Exec)
	}
	return nil
}

// vmFor is the [[vm]] of a group, as Fly picks it: the last one naming the group, else
// the first that names none.
func (c *Config) vmFor(group string) *VM {
	var generic, named *VM
	for i := range c.VM {
		vm := &c.VM[i]
		switch {
		case slices.Contains(vm.Processes, group):
			named = vm
		case len(vm.Processes) == 0 && generic == nil:
			generic = vm
		}
	}
	if named != nil {
		return named
	}
	return generic
}

// setGuest sizes a machine as Fly does: the preset (by default def), then memory,
// then memory_mb and cpus. machine.Validate fills what is not given from the preset.
func setGuest(cfg *api.MachineConfig, vm *VM, def string) {
	cfg.Size = def
	if vm == nil {
		return
	}
	if vm.Size != "" {
		cfg.Size = vm.Size
	}
	if vm.Memory != "" {
		cfg.Guest.MemoryMB, _ = vm.Memory.MB() // checked in Parse
	}
	if vm.MemoryMB > 0 {
		cfg.Guest.MemoryMB = vm.MemoryMB
	}
	cfg.Guest.CPUs = vm.CPUs
	cfg.Guest.CPUKind = vm.CPUKind
}

func concurrency(c *Concurrency) *api.Concurrency {
	if c == nil {
		return nil
	}
	return &api.Concurrency{Type: c.Type, SoftLimit: c.SoftLimit, HardLimit: c.HardLimit}
}

func tcpCheck(tc TCPCheck) api.Check {
	return api.Check{
		Type:        "tcp",
		Interval:    clampCheck(tc.Interval, checkMinimum),
		Timeout:     clampCheck(tc.Timeout, checkMinimum),
		GracePeriod: clampCheck(tc.GracePeriod, checkMinimum),
	}
}

// httpCheck converts an HTTP check; a service's own checks take Fly's bounds on their
// durations (clamp), top-level checks were bounded in Parse. What kiln ignores is kept
// in the check as Fly would send it.
func httpCheck(hc HTTPCheck, clamp bool) api.Check {
	check := tcpCheck(hc.TCPCheck)
	if !clamp {
		check.Interval, check.Timeout, check.GracePeriod = keepNonZero(hc.Interval), keepNonZero(hc.Timeout), keepNonZero(hc.GracePeriod)
	}
	check.Type = "http"
	check.Path = hc.Path
	check.Method = jsonValue(strings.ToUpper(hc.Method))
	check.Protocol = jsonValue(hc.Protocol)
	check.TLSSkipVerify = jsonValue(hc.TLSSkipVerify)
	check.TLSServerName = jsonValue(hc.TLSServerName)
	check.Headers = jsonValue(hc.Headers)
	return check
}

func keepNonZero(d Duration) string {
	if v, err := parseDuration(string(d)); err != nil || v == 0 {
		return ""
	}
	return string(d)
}

// jsonValue is v as an Ignored field holds it: nil for a zero or empty value, which
// leaves the field out.
func jsonValue(v any) json.RawMessage {
	rv := reflect.ValueOf(v)
	if rv.IsZero() || (rv.Kind() == reflect.Map && rv.Len() == 0) {
		return nil
	}
	raw, _ := json.Marshal(v) // maps marshal with sorted keys: deterministic
	return raw
}

// InlineLocalFiles replaces each [[files]] local_path with the contents read for it
// (base64, by path), as kiln deploy sends them; a path with none is an error naming it.
func (c *Config) InlineLocalFiles(contents map[string]string) error {
	for i, f := range c.Files {
		if f.LocalPath == "" {
			continue
		}
		v, ok := contents[f.LocalPath]
		if !ok {
			return errdefs.Invalid("files[%d].local_path %s: its contents were not sent (kiln deploy reads it beside the config)", i, f.LocalPath)
		}
		c.Files[i].RawValue, c.Files[i].LocalPath = v, ""
	}
	return nil
}

// ReleaseMachineConfig is the config of the temporary machine that runs
// [deploy] release_command with image, as Fly makes it: the app's env with
// RELEASE_COMMAND=1, no services or mounts, no restarts, destroyed when it exits,
// sized by release_command_vm (by default Fly's shared-cpu-2x).
func (c *Config) ReleaseMachineConfig(image string) (api.MachineConfig, error) {
	if c.Deploy.ReleaseCommand == "" {
		return api.MachineConfig{}, errdefs.Invalid("the config has no [deploy] release_command")
	}
	cfg := api.MachineConfig{
		Image:       image,
		Env:         c.env(map[string]string{ProcessGroupEnv: ReleaseCommandGroup, "RELEASE_COMMAND": "1"}),
		Metadata:    map[string]string{ProcessGroupMetadata: ReleaseCommandGroup},
		Restart:     api.Restart{Policy: "no"},
		AutoDestroy: true,
		StopConfig:  c.stopConfig(),
	}
	if err := c.setInit(&cfg.Init, c.Deploy.ReleaseCommand); err != nil {
		return cfg, fmt.Errorf("deploy.release_command: %w", err)
	}
	cfg.Init.Exec = nil // Fly runs the release command under the image's entrypoint
	setGuest(&cfg, c.Deploy.ReleaseCommandVM, DefaultReleaseVMSize)
	return cfg, nil
}
