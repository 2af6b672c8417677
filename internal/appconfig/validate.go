package appconfig

import (
	"fmt"
	"maps"
	"math"
	"path"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/google/shlex"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/vmm"
)

var (
	// appRE is the server's rule for app names (internal/server's appNameOK).
	appRE   = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)
	groupRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)
	envRE   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
)

// validate checks what one key says on its own and across keys; the checks that
// need a whole process group run in Parse through groupConfig.
func (c *Config) validate() error {
	for _, check := range []func() error{
		c.validateTop, c.validateProcesses, c.validateServices, c.validateChecks,
		c.validateMounts, c.validateVMs, c.validateDeploy, c.validateRestarts,
		c.validateFiles, c.validateKiln,
	} {
		if err := check(); err != nil {
			return err
		}
	}
	for _, g := range c.Groups() {
		if _, err := c.groupConfig(g); err != nil {
			return err
		}
	}
	return nil
}

func (c *Config) validateTop() error {
	if c.App == "" {
		return errdefs.Invalid(`app is required: the name of the kiln app, like app = "my-app"`)
	}
	if !appRE.MatchString(c.App) {
		return errdefs.Invalid("app %q: use 1 to 63 lowercase letters, digits and dashes, starting with a letter or digit", c.App)
	}
	if c.KillSignal != "" {
		if _, err := machine.SignalNumber(c.KillSignal); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "kill_signal")
		}
	}
	if c.KillTimeout != "" {
		if err := machine.CheckStopGrace(c.KillTimeout); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "kill_timeout")
		}
	}
	for k := range c.Env {
		if !envRE.MatchString(k) {
			return errdefs.Invalid("env key %q is not a valid environment variable name: use letters, digits and underscores, not starting with a digit", k)
		}
	}
	if c.Build != nil {
		for k := range c.Build.Args {
			if k == "" {
				return errdefs.Invalid("build.args: a build argument needs a name")
			}
		}
	}
	if c.Experimental != nil && len(c.Processes) > 0 && len(c.Experimental.Cmd) > 0 {
		c.note("experimental.cmd", "each group runs its [processes] command instead")
	}
	return nil
}

func (c *Config) validateProcesses() error {
	if len(c.Processes) > MaxGroups {
		return errdefs.Invalid("[processes] has %d groups, over the limit of %d", len(c.Processes), MaxGroups)
	}
	for _, g := range slices.Sorted(maps.Keys(c.Processes)) {
		if !groupRE.MatchString(g) {
			return errdefs.Invalid("processes.%s: a process group's name is 1 to 63 lowercase letters, digits, dashes and underscores, starting with a letter or digit", g)
		}
		if _, err := shlex.Split(c.Processes[g]); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "processes.%s %q: quote it as a shell would", g, c.Processes[g])
		}
	}
	return nil
}

// checkGroups checks that an entry's processes list names groups that exist.
func (c *Config) checkGroups(at string, processes []string) error {
	for _, p := range processes {
		if !c.hasGroup(p) {
			return errdefs.Invalid("%s.processes names %q, which is not a process group: add it to [processes] or use one of %s", at, p, strings.Join(c.Groups(), ", "))
		}
	}
	return nil
}

// checkServiceGroups is Fly's rule: once there is a [processes] table, each service
// names the groups it serves.
func (c *Config) checkServiceGroups(at string, processes []string) error {
	if len(processes) == 0 && len(c.Processes) > 0 {
		return errdefs.Invalid("%s has no processes but the app has [processes]: set processes = [%q] (or the groups it serves), as Fly requires", at, c.DefaultGroup())
	}
	return c.checkGroups(at, processes)
}

func (c *Config) validateServices() error {
	if s := c.HTTPService; s != nil {
		c.note("http_service", "served on port 80 only: kiln's proxy does not terminate TLS on 443")
		if err := c.checkServiceGroups("http_service", s.Processes); err != nil {
			return err
		}
		if err := checkServiceCommon("http_service", s.InternalPort, s.AutoStopMachines, s.MinMachinesRunning, s.Concurrency); err != nil {
			return err
		}
		for i, hc := range s.Checks {
			if err := c.checkHTTPCheck(fmt.Sprintf("http_service.checks[%d]", i), hc); err != nil {
				return err
			}
		}
	}
	for i, s := range c.Services {
		at := fmt.Sprintf("services[%d]", i)
		if err := c.checkServiceGroups(at, s.Processes); err != nil {
			return err
		}
		switch s.Protocol {
		case "", "tcp":
		case "udp":
			return errdefs.New(errdefs.ErrNotImplemented, "%s.protocol udp: kiln's proxy serves TCP only", at)
		default:
			return errdefs.Invalid("%s.protocol %q: want tcp", at, s.Protocol)
		}
		if err := checkServiceCommon(at, s.InternalPort, s.AutoStopMachines, s.MinMachinesRunning, s.Concurrency); err != nil {
			return err
		}
		served := 0
		for j, p := range s.Ports {
			pat := fmt.Sprintf("%s.ports[%d]", at, j)
			if p.Port < 1 || p.Port > 65535 {
				return errdefs.Invalid("%s.port %d: want a public port, 1 to 65535", pat, p.Port)
			}
			switch tls, err := checkHandlers(pat, p.Handlers); {
			case err != nil:
				return err
			case tls:
				c.note(pat, fmt.Sprintf("port %d uses tls, which kiln's proxy does not terminate: not served", p.Port))
			default:
				served++
			}
		}
		if served == 0 {
			return errdefs.Invalid("%s has no port kiln can serve: add a [[services.ports]] with port = 80 and handlers = [\"http\"] (kiln's proxy does not terminate TLS)", at)
		}
		for j, tc := range s.TCPChecks {
			if err := checkDurations(fmt.Sprintf("%s.tcp_checks[%d]", at, j), tc); err != nil {
				return err
			}
		}
		for j, hc := range s.HTTPChecks {
			if err := c.checkHTTPCheck(fmt.Sprintf("%s.http_checks[%d]", at, j), hc); err != nil {
				return err
			}
		}
	}
	return nil
}

func checkServiceCommon(at string, internalPort int, autostop Autostop, minRunning int, conc *Concurrency) error {
	if internalPort < 1 || internalPort > 65535 {
		return errdefs.Invalid("%s.internal_port %d: want the port the app listens on, 1 to 65535", at, internalPort)
	}
	switch autostop {
	case "", "off", "stop", "suspend":
	default:
		return errdefs.Invalid("%s.auto_stop_machines %q: want true, false, \"off\", \"stop\" or \"suspend\"", at, autostop)
	}
	if minRunning < 0 {
		return errdefs.Invalid("%s.min_machines_running %d must not be negative", at, minRunning)
	}
	if conc != nil {
		switch conc.Type {
		case "", "connections", "requests":
		default:
			return errdefs.Invalid("%s.concurrency.type %q: want connections or requests", at, conc.Type)
		}
		if conc.SoftLimit < 0 || conc.HardLimit < 0 || (conc.HardLimit > 0 && conc.SoftLimit > conc.HardLimit) {
			return errdefs.Invalid("%s.concurrency: soft_limit %d and hard_limit %d must not be negative, with soft_limit <= hard_limit", at, conc.SoftLimit, conc.HardLimit)
		}
	}
	return nil
}

// checkHandlers says whether a port's handlers include tls, which kiln does not
// serve, and refuses handlers that change what the app sees.
func checkHandlers(at string, handlers []string) (tls bool, err error) {
	for _, h := range handlers {
		switch h {
		case "http":
		case "tls":
			tls = true
		case "proxy_proto", "pg_tls", "edge_http":
			return false, errdefs.New(errdefs.ErrNotImplemented, "%s.handlers: kiln's proxy has no %s handler: use [\"http\"] or none for raw TCP", at, h)
		default:
			return false, errdefs.Invalid("%s.handlers: %q is not a handler: use [\"http\"] or none for raw TCP", at, h)
		}
	}
	return tls, nil
}

func checkDurations(at string, tc TCPCheck) error {
	for _, d := range []struct {
		key string
		v   Duration
	}{{"interval", tc.Interval}, {"timeout", tc.Timeout}, {"grace_period", tc.GracePeriod}} {
		if d.v == "" {
			continue
		}
		if _, err := parseDuration(string(d.v)); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "%s.%s (an integer is milliseconds)", at, d.key)
		}
	}
	return nil
}

// checkHTTPCheck checks an HTTP check and notes what kiln ignores of it.
func (c *Config) checkHTTPCheck(at string, hc HTTPCheck) error {
	if err := checkDurations(at, hc.TCPCheck); err != nil {
		return err
	}
	if hc.Path != "" && !strings.HasPrefix(hc.Path, "/") {
		return errdefs.Invalid("%s.path %q must start with /", at, hc.Path)
	}
	if hc.Method != "" && !strings.EqualFold(hc.Method, "GET") {
		c.note(at+".method", "kiln checks with GET")
	}
	if strings.EqualFold(hc.Protocol, "https") || hc.TLSSkipVerify || hc.TLSServerName != "" {
		c.note(at+".protocol", "kiln checks over plain HTTP")
	}
	if len(hc.Headers) > 0 {
		c.note(at+".headers", "kiln's checks send no extra headers")
	}
	return nil
}

func (c *Config) validateChecks() error {
	for _, name := range slices.Sorted(maps.Keys(c.Checks)) {
		ch := c.Checks[name]
		at := "checks." + name
		if err := c.checkGroups(at, ch.Processes); err != nil {
			return err
		}
		if ch.Type != "tcp" && ch.Type != "http" {
			return errdefs.Invalid("%s.type %q: want tcp or http", at, ch.Type)
		}
		if ch.Port < 0 || ch.Port > 65535 {
			return errdefs.Invalid("%s.port %d: want the port to check, 1 to 65535", at, ch.Port)
		}
		if err := c.checkHTTPCheck(at, ch.HTTPCheck); err != nil {
			return err
		}
		// Fly's bounds for top-level checks.
		if d, _ := parseDuration(string(ch.Interval)); ch.Interval != "" && d < topLevelIntervalMinimum {
			return errdefs.Invalid("%s.interval %s is too short: Fly's minimum is %s", at, ch.Interval, topLevelIntervalMinimum)
		}
		if d, _ := parseDuration(string(ch.Timeout)); d > checkMaximum {
			return errdefs.Invalid("%s.timeout %s is too long: Fly's maximum is %s", at, ch.Timeout, checkMaximum)
		}
	}
	return nil
}

func (c *Config) validateMounts() error {
	perGroup := map[string]int{}
	for i, m := range c.Mounts {
		at := fmt.Sprintf("mounts[%d]", i)
		if len(c.Mounts) == 1 {
			at = "mounts"
		}
		if err := c.checkGroups(at, m.Processes); err != nil {
			return err
		}
		if m.Source == "" {
			return errdefs.Invalid("%s.source is required: the name of the volume to mount", at)
		}
		if err := vmm.CheckMountPath(m.Destination); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "%s.destination", at)
		}
		if m.InitialSize != "" {
			if gb, err := m.InitialSize.GB(); err != nil || gb < 1 {
				return errdefs.Invalid("%s.initial_size %q: want at least 1 GB, like \"10gb\" (a bare number is GB)", at, m.InitialSize)
			}
		}
		for _, g := range c.Groups() {
			if c.appliesTo(m.Processes, g) {
				if perGroup[g]++; perGroup[g] > 1 {
					return errdefs.Invalid("%s: process group %s has more than one mount: Fly allows one volume per machine", at, g)
				}
			}
		}
	}
	return nil
}

func (c *Config) validateVMs() error {
	for i, vm := range c.VM {
		at := fmt.Sprintf("vm[%d]", i)
		if err := c.checkGroups(at, vm.Processes); err != nil {
			return err
		}
		if err := checkVM(at, vm); err != nil {
			return err
		}
	}
	if vm := c.Deploy.ReleaseCommandVM; vm != nil {
		return checkVM("deploy.release_command_vm", *vm)
	}
	return nil
}

func checkVM(at string, vm VM) error {
	if vm.Size != "" {
		// machine.Validate is the one place that knows the presets; with the guest
		// given, the size name is all it can refuse here.
		probe := api.MachineConfig{Image: "localhost/probe:1", Size: vm.Size, Guest: api.Guest{CPUs: 1, MemoryMB: 256}}
		if err := machine.Validate(&probe); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "%s.size", at)
		}
	}
	if vm.Memory != "" {
		if mb, err := vm.Memory.MB(); err != nil || mb < 1 {
			return errdefs.Invalid("%s.memory %q: want a size like \"512mb\" or \"1gb\" (a bare number is MB)", at, vm.Memory)
		}
	}
	if vm.MemoryMB < 0 || vm.CPUs < 0 {
		return errdefs.Invalid("%s: cpus and memory_mb must not be negative", at)
	}
	return nil
}

func (c *Config) validateDeploy() error {
	d := c.Deploy
	switch d.Strategy {
	case "":
	case "canary", "bluegreen":
		if len(c.Mounts) > 0 {
			return errdefs.Invalid("deploy.strategy %q cannot be used with [mounts]: Fly refuses it too: volumes cannot be attached to two machines at once; use rolling or immediate", d.Strategy)
		}
	default:
		if !slices.Contains(Strategies, d.Strategy) {
			return errdefs.Invalid("deploy.strategy %q is not a deploy strategy: use one of %s", d.Strategy, strings.Join(Strategies, ", "))
		}
	}
	if x := d.MaxUnavailable; x < 0 || math.IsNaN(x) || math.IsInf(x, 0) || (x >= 1 && x != math.Trunc(x)) {
		return errdefs.Invalid("deploy.max_unavailable %v: want a fraction of the machines (0 < x < 1, like 0.25) or a whole count of at least 1", x)
	}
	if _, err := shlex.Split(d.ReleaseCommand); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalid, err, "deploy.release_command %q: quote it as a shell would", d.ReleaseCommand)
	}
	for key, v := range map[string]string{"wait_timeout": d.WaitTimeout, "release_command_timeout": d.ReleaseCommandTimeout} {
		if v == "" {
			continue
		}
		if dur, err := parseDuration(v); err != nil || dur == 0 {
			return errdefs.Invalid("deploy.%s %q: want a duration like \"5m\" (an integer is seconds)", key, v)
		} else if dur > MaxTimeout {
			return errdefs.Invalid("deploy.%s %s is over the limit of %s: a deploy that waits holds the app's next one back", key, dur, MaxTimeout)
		}
	}
	return nil
}

func (c *Config) validateRestarts() error {
	for i, r := range c.Restart {
		at := fmt.Sprintf("restart[%d]", i)
		if err := c.checkGroups(at, r.Processes); err != nil {
			return err
		}
		if _, ok := restartPolicies[r.Policy]; !ok {
			return errdefs.Invalid("%s.policy %q: want never, always or on-failure", at, r.Policy)
		}
		if r.Retries < 0 {
			return errdefs.Invalid("%s.retries %d must not be negative", at, r.Retries)
		}
	}
	return nil
}

// restartPolicies maps Fly's fly.toml words to the machine API's.
var restartPolicies = map[string]string{"never": "no", "always": "always", "on-failure": "on-failure"}

func (c *Config) validateFiles() error {
	for i, f := range c.Files {
		at := fmt.Sprintf("files[%d]", i)
		if err := c.checkGroups(at, f.Processes); err != nil {
			return err
		}
		if !path.IsAbs(f.GuestPath) {
			return errdefs.Invalid("%s.guest_path %q: want the absolute path of the file in the machine", at, f.GuestPath)
		}
		n := 0
		for _, v := range []string{f.LocalPath, f.RawValue, f.SecretName} {
			if v != "" {
				n++
			}
		}
		if n != 1 {
			return errdefs.Invalid("%s: give exactly one of local_path, raw_value and secret_name", at)
		}
		if f.SecretName != "" && !envRE.MatchString(f.SecretName) {
			return errdefs.Invalid("%s.secret_name %q is not a valid secret name: use letters, digits and underscores, not starting with a digit", at, f.SecretName)
		}
	}
	return nil
}

func (c *Config) validateKiln() error {
	if c.Kiln.Project != "" {
		if err := build.ValidProject(c.Kiln.Project); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "kiln.project")
		}
	}
	for _, g := range slices.Sorted(maps.Keys(c.Kiln.Counts)) {
		if !c.hasGroup(g) {
			return errdefs.Invalid("kiln.counts.%s: %s is not a process group: use one of %s", g, g, strings.Join(c.Groups(), ", "))
		}
		if n := c.Kiln.Counts[g]; n < 0 || n > MaxCount {
			return errdefs.Invalid("kiln.counts.%s %d: give 0 to %d machines", g, n, MaxCount)
		}
	}
	return nil
}

// note records a key kiln accepts with no effect.
func (c *Config) note(key, why string) {
	c.Ignored = append(c.Ignored, key+": "+why)
	slices.Sort(c.Ignored)
	c.Ignored = slices.Compact(c.Ignored)
}

// clampCheck applies Fly's bounds on a service check's duration: below min it is
// raised, above a minute lowered (Fly warns and does the same); zero is left out.
func clampCheck(d Duration, min time.Duration) string {
	v, err := parseDuration(string(d))
	switch {
	case d == "" || err != nil || v == 0:
		return ""
	case v < min:
		return min.String()
	case v > checkMaximum:
		return checkMaximum.String()
	}
	return string(d)
}
