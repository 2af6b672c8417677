package machine

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"path"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/vmm"
)

// This file holds a machine's config rules: each is checked here and nowhere else (the
// VM size and mount path rules are vmm's, which the VM layer checks with the same
// functions).

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// InternalApp says whether an app is kiln's own (its builders): users cannot create
// such a name, see it in the API or make machines in it.
func InternalApp(app string) bool { return strings.HasPrefix(app, "_") }

// sizes are Fly's guest presets that kiln honours: vCPUs and MiB.
var sizes = map[string][2]int{
	"shared-cpu-1x": {1, 256}, "shared-cpu-2x": {2, 512}, "shared-cpu-4x": {4, 1024}, "shared-cpu-8x": {8, 2048},
	"performance-1x": {1, 2048}, "performance-2x": {2, 4096}, "performance-4x": {4, 8192}, "performance-8x": {8, 16384},
}

// checkUnsupported refuses Fly's fields that kiln cannot honour, where a value is given:
// a workload would miss what they promise (a file, a GPU, a schedule). Empty values
// (null, [], {}, "", false, 0) pass, as Fly's clients send them.
func checkUnsupported(cfg *api.MachineConfig) error {
	type field struct {
		name string
		v    api.Unsupported
	}
	fields := []field{
		{"config.processes", cfg.Processes}, {"config.containers", cfg.Containers},
		{"config.volumes", cfg.Volumes}, {"config.statics", cfg.Statics}, {"config.schedule", cfg.Schedule},
		{"config.guest.gpus", cfg.Guest.GPUs}, {"config.guest.gpu_kind", cfg.Guest.GPUKind},
		{"config.guest.kernel_args", cfg.Guest.KernelArgs}, {"config.init.kernel_args", cfg.Init.KernelArgs},
	}
	for i, svc := range cfg.Services {
		for j, p := range svc.Ports {
			at := fmt.Sprintf("config.services[%d].ports[%d].", i, j)
			fields = append(fields, field{at + "start_port", p.StartPort}, field{at + "end_port", p.EndPort})
		}
	}
	for _, f := range fields {
		if !emptyJSON(f.v) {
			return errdefs.New(errdefs.ErrNotImplemented, "%s is a Fly field kiln does not support (see the README's list): leave it out", f.name)
		}
	}
	return nil
}

// emptyJSON says whether a raw value is absent or empty.
func emptyJSON(raw json.RawMessage) bool {
	if len(raw) == 0 {
		return true
	}
	var v any
	if json.Unmarshal(raw, &v) != nil {
		return false
	}
	switch v := v.(type) {
	case nil:
		return true
	case bool:
		return !v
	case float64:
		return v == 0
	case string:
		return v == ""
	case []any:
		return len(v) == 0
	case map[string]any:
		return len(v) == 0
	}
	return false
}

// MaxConfigBytes bounds a machine's config as stored.
const MaxConfigBytes = 64 << 10

// MaxMetadataKeys bounds a machine's metadata, which every read of the machine carries.
const MaxMetadataKeys = 64

// CheckMetadata checks a machine's metadata as it would be.
func CheckMetadata(md map[string]string) error {
	if len(md) > MaxMetadataKeys {
		return errdefs.Invalid("metadata: %d keys, over the limit of %d", len(md), MaxMetadataKeys)
	}
	for k, v := range md {
		if k == "" || len(k) > 128 || len(v) > 4096 {
			return errdefs.Invalid("metadata %.140q: keys are 1 to 128 characters, values up to 4096", k)
		}
	}
	return nil
}

// CheckName checks a machine's name.
func CheckName(name string) error {
	if !nameRE.MatchString(name) {
		return errdefs.Invalid("name %q: use lowercase letters, digits and dashes, up to 63", name)
	}
	return nil
}

// DecodeConfig reads a stored config. Stored configs were validated on the way in; a
// record that does not decode yields the zero config.
func DecodeConfig(raw []byte) api.MachineConfig {
	var c api.MachineConfig
	json.Unmarshal(raw, &c)
	return c
}

// Size is what the machine asks of its host.
func Size(cfg api.MachineConfig) (cpus, memoryMiB int) { return cfg.Guest.CPUs, cfg.Guest.MemoryMB }

// Validate checks a config and fills its defaults. Every error names the field.
func Validate(cfg *api.MachineConfig) error {
	if cfg.Image == "" {
		return errdefs.Invalid("config.image is required: the image to run, e.g. localhost/app:1")
	}
	if _, err := image.NormalizeRef(cfg.Image); err != nil && !strings.HasPrefix(cfg.Image, "sha256:") {
		return errdefs.Wrap(errdefs.ErrInvalid, err, "config.image")
	}
	if err := checkUnsupported(cfg); err != nil {
		return err
	}
	if err := CheckMetadata(cfg.Metadata); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalid, err, "config")
	}
	// Stored as sent and served with every read of the machine: bounded as stored (JSON
	// may write each byte of a string as six).
	if raw, _ := json.Marshal(cfg); len(raw) > MaxConfigBytes {
		return errdefs.Invalid("config is %d KiB as stored, over the limit of %d KiB: send less (Fly's fields kiln ignores are kept as sent)", len(raw)>>10, MaxConfigBytes>>10)
	}
	if cfg.Size != "" {
		preset, ok := sizes[cfg.Size]
		if !ok {
			return errdefs.Invalid("config.size %q is not a size kiln knows: use one of %s, or set config.guest.cpus and memory_mb", cfg.Size, strings.Join(slices.Sorted(maps.Keys(sizes)), ", "))
		}
		if cfg.Guest.CPUs == 0 {
			cfg.Guest.CPUs = preset[0]
		}
		if cfg.Guest.MemoryMB == 0 {
			cfg.Guest.MemoryMB = preset[1]
		}
	}
	if cfg.Guest.CPUs == 0 {
		cfg.Guest.CPUs = 1
	}
	if cfg.Guest.MemoryMB == 0 {
		cfg.Guest.MemoryMB = 256
	}
	if err := vmm.CheckSize(cfg.Guest.CPUs, cfg.Guest.MemoryMB, "config.guest.cpus", "config.guest.memory_mb"); err != nil {
		return err
	}
	if err := (RestartPolicy{Policy: cfg.Restart.Policy, MaxRetries: cfg.Restart.MaxRetries}).Validate(); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalid, err, "config")
	}
	seen := map[string]bool{}
	for i, mt := range cfg.Mounts {
		if mt.Volume == "" {
			return errdefs.Invalid("config.mounts[%d].volume is required: a volume name or ID", i)
		}
		if err := vmm.CheckMountPath(mt.Path); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "config.mounts[%d].path", i)
		}
		if seen[mt.Volume] {
			return errdefs.Invalid("config.mounts: volume %s is mounted twice", mt.Volume)
		}
		seen[mt.Volume] = true
	}
	if cfg.StopConfig != nil && cfg.StopConfig.Timeout != "" {
		if err := CheckStopGrace(string(cfg.StopConfig.Timeout)); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "config.stop_config")
		}
	}
	if cfg.StopConfig != nil && cfg.StopConfig.Signal != "" {
		if _, err := SignalNumber(cfg.StopConfig.Signal); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "config.stop_config")
		}
	}
	for k := range cfg.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return errdefs.Invalid("config.env key %q is not a valid variable name", k)
		}
	}
	if err := CheckFiles(cfg.Files); err != nil {
		return err
	}
	for i := range cfg.Services {
		if err := validateService(&cfg.Services[i]); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "config.services[%d]", i)
		}
	}
	return nil
}

// MaxFiles bounds a machine's config.files (their contents are bounded with the config).
const MaxFiles = 16

// CheckFiles checks config.files: absolute, clean paths outside the kernel's own
// filesystems, each with base64 contents or a secret's name, and permission bits.
func CheckFiles(files []api.File) error {
	if len(files) > MaxFiles {
		return errdefs.Invalid("config.files: %d files, over the limit of %d", len(files), MaxFiles)
	}
	seen := map[string]bool{}
	for i, f := range files {
		at := fmt.Sprintf("config.files[%d]", i)
		p := f.GuestPath
		if !path.IsAbs(p) || path.Clean(p) != p || p == "/" {
			return errdefs.Invalid("%s.guest_path %q: give an absolute, clean path to a file, like /etc/app/config.json", at, p)
		}
		for _, root := range []string{"/proc", "/sys", "/dev"} {
			if p == root || strings.HasPrefix(p, root+"/") {
				return errdefs.Invalid("%s.guest_path %s is under %s, which the kernel provides: write the file elsewhere", at, p, root)
			}
		}
		if seen[p] {
			return errdefs.Invalid("%s.guest_path %s is given twice", at, p)
		}
		seen[p] = true
		switch {
		case (f.RawValue == nil) == (f.SecretName == nil):
			return errdefs.Invalid("%s: give raw_value (base64) or secret_name, one of them", at)
		case f.RawValue != nil:
			if _, err := base64.StdEncoding.DecodeString(*f.RawValue); err != nil {
				return errdefs.Wrap(errdefs.ErrInvalid, err, "%s.raw_value is not base64", at)
			}
		case *f.SecretName == "":
			return errdefs.Invalid("%s.secret_name is empty: name one of the app's secrets (kiln secrets ls)", at)
		}
		if f.Mode > 0o7777 {
			return errdefs.Invalid("%s.mode %o: give permission bits, like 0644 (420)", at, f.Mode)
		}
	}
	return nil
}

// validateService checks one service and fills its defaults.
func validateService(s *api.Service) error {
	if s.Protocol == "" {
		s.Protocol = "tcp"
	}
	if s.Protocol != "tcp" {
		return fmt.Errorf("protocol %q is not supported: use tcp (with handlers [\"http\"] for HTTP)", s.Protocol)
	}
	if s.InternalPort < 1 || s.InternalPort > 65535 {
		return fmt.Errorf("internal_port %d: want the port the machine listens on, 1 to 65535", s.InternalPort)
	}
	if len(s.Ports) == 0 {
		return fmt.Errorf("ports: a service needs at least one public port, like {\"port\": 80, \"handlers\": [\"http\"]}")
	}
	for j, p := range s.Ports {
		if p.Port < 1 || p.Port > 65535 {
			return fmt.Errorf("ports[%d].port %d: want 1 to 65535", j, p.Port)
		}
		for _, h := range p.Handlers {
			if h != "http" {
				return fmt.Errorf("ports[%d].handlers: %q is not supported: use [\"http\"] or none for raw TCP", j, h)
			}
		}
	}
	switch s.Autostop {
	case "":
		s.Autostop = "off"
	case "off", "stop", "suspend":
	default:
		return fmt.Errorf("autostop %q: want off, stop or suspend", s.Autostop)
	}
	if s.Autostart == nil {
		on := s.Autostop != "off"
		s.Autostart = &on
	}
	if s.MinMachinesRunning < 0 {
		return fmt.Errorf("min_machines_running %d must not be negative", s.MinMachinesRunning)
	}
	if c := s.Concurrency; c != nil {
		if c.Type == "" {
			c.Type = "connections"
		}
		if c.Type != "connections" && c.Type != "requests" {
			return fmt.Errorf("concurrency.type %q: want connections or requests", c.Type)
		}
		if c.SoftLimit < 0 || c.HardLimit < 0 || (c.HardLimit > 0 && c.SoftLimit > c.HardLimit) {
			return fmt.Errorf("concurrency: soft_limit %d and hard_limit %d must be positive with soft <= hard", c.SoftLimit, c.HardLimit)
		}
	}
	for j, c := range s.Checks {
		if c.Type != "tcp" && c.Type != "http" {
			return fmt.Errorf("checks[%d].type %q: want tcp or http", j, c.Type)
		}
		for name, d := range map[string]string{"interval": c.Interval, "timeout": c.Timeout, "grace_period": c.GracePeriod} {
			if d == "" {
				continue
			}
			if v, err := time.ParseDuration(d); err != nil || v <= 0 {
				return fmt.Errorf("checks[%d].%s %q: want a duration like 5s", j, name, d)
			}
		}
		if c.Type == "http" && c.Path != "" && !strings.HasPrefix(c.Path, "/") {
			return fmt.Errorf("checks[%d].path %q must start with /", j, c.Path)
		}
	}
	return nil
}

// Workload is what the machine runs: config.init overrides, else the image's own
// command, with the config's environment after the image's. Execs run as it does.
func Workload(cfg api.MachineConfig, run image.Run) guest.ExecRequest {
	argv := run.Argv
	switch {
	case len(cfg.Init.Exec) > 0:
		argv = cfg.Init.Exec
	case len(cfg.Init.Entrypoint) > 0 || len(cfg.Init.Cmd) > 0:
		argv = append(append([]string{}, cfg.Init.Entrypoint...), cfg.Init.Cmd...)
	}
	env := append([]string{}, run.Env...)
	keys := make([]string, 0, len(cfg.Env))
	for k := range cfg.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = append(env, k+"="+cfg.Env[k])
	}
	return guest.ExecRequest{Argv: argv, Env: env, Dir: run.Dir, UID: run.UID, GID: run.GID}
}

// DefaultStopGrace is how long a stopping workload has when stop_config says nothing;
// MaxStopGrace bounds what a config or a stop request may ask: a workload that ignores
// its signal must not hold kiln's shutdown, or its recovery of every other machine.
const (
	DefaultStopGrace = 10 * time.Second
	MaxStopGrace     = 5 * time.Minute
)

// CheckStopGrace checks a stop timeout: a duration up to MaxStopGrace.
func CheckStopGrace(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return errdefs.Invalid("timeout %q: want a duration like 10s", s)
	}
	if d > MaxStopGrace {
		return errdefs.Invalid("timeout %s is over the limit of %s: a workload gets at most that to exit before its VM is powered off", d, MaxStopGrace)
	}
	return nil
}

// StopGrace is how long the workload has to exit after the stop signal.
func StopGrace(cfg api.MachineConfig) time.Duration {
	if cfg.StopConfig != nil {
		if d, err := time.ParseDuration(string(cfg.StopConfig.Timeout)); err == nil && d > 0 {
			return min(d, MaxStopGrace) // configs stored before the limit
		}
	}
	return DefaultStopGrace
}

// StopSignal is the config's stop signal; 0 when it names none (power off at once).
func StopSignal(cfg api.MachineConfig) int {
	if cfg.StopConfig == nil {
		return 0
	}
	n, _ := SignalNumber(cfg.StopConfig.Signal)
	return n
}

// SignalNumber reads a signal name (SIGTERM, TERM) or number.
func SignalNumber(s string) (int, error) {
	names := map[string]int{"HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "USR1": 10, "USR2": 12, "TERM": 15, "CONT": 18, "STOP": 19}
	u := strings.TrimPrefix(strings.ToUpper(strings.TrimSpace(s)), "SIG")
	if n, ok := names[u]; ok {
		return n, nil
	}
	if n, err := strconv.Atoi(s); err == nil && n > 0 && n < 65 {
		return n, nil
	}
	return 0, errdefs.Invalid("signal %q: use a name like SIGTERM, SIGINT, SIGHUP, SIGKILL, SIGUSR1 or a number", s)
}
