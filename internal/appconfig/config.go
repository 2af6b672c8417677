// Package appconfig reads an app's fly.toml, or kiln.toml (the same format plus a
// [kiln] table), as Fly documents it (https://fly.io/docs/reference/configuration/),
// and turns it into kiln machine configs, one per process group. The deploy engine
// and the CLI call it; it does no I/O beyond Load reading the file.
//
// Every key Fly documents is either honoured, accepted with no effect (listed in
// Config.Ignored), or refused with errdefs.ErrNotImplemented naming it; a key Fly does
// not document is an error naming its dotted path. Nothing is dropped silently.
package appconfig

import (
	"io"
	"math"
	"os"
	"slices"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Config is an app's config as read from fly.toml/kiln.toml. It round-trips through
// JSON (each release stores it): Parse returns it in the form JSON gives back. Durations
// are Go duration strings, whatever form the file used.
type Config struct {
	App           string `toml:"app" json:"app"`
	PrimaryRegion string `toml:"primary_region" json:"primary_region,omitempty"` // accepted; kiln places by capacity
	KillSignal    string `toml:"kill_signal" json:"kill_signal,omitempty"`
	// KillTimeout is a duration ("5s"); the file may give an integer of seconds.
	KillTimeout    string `toml:"-" json:"kill_timeout,omitempty"`
	SwapSizeMB     int    `toml:"swap_size_mb" json:"swap_size_mb,omitempty"`       // accepted, ignored
	ConsoleCommand string `toml:"console_command" json:"console_command,omitempty"` // accepted, ignored

	Build        *Build            `toml:"build" json:"build,omitempty"`
	Env          map[string]string `toml:"-" json:"env,omitempty"`
	Experimental *Experimental     `toml:"experimental" json:"experimental,omitempty"`
	HTTPService  *HTTPService      `toml:"http_service" json:"http_service,omitempty"`
	Services     []Service         `toml:"services" json:"services,omitempty"`
	Checks       map[string]Check  `toml:"checks" json:"checks,omitempty"`
	Mounts       []Mount           `toml:"-" json:"mounts,omitempty"`    // [mounts] or [[mounts]]
	VM           []VM              `toml:"-" json:"vm,omitempty"`        // [[vm]] or [vm]
	Processes    map[string]string `toml:"-" json:"processes,omitempty"` // group = "command line"
	Deploy       Deploy            `toml:"-" json:"deploy"`
	Restart      []Restart         `toml:"restart" json:"restart,omitempty"`
	Files        []File            `toml:"files" json:"files,omitempty"`
	Metrics      []Metrics         `toml:"-" json:"metrics,omitempty"` // accepted, ignored
	Kiln         Kiln              `toml:"kiln" json:"kiln"`

	// Ignored lists the keys of this file that kiln accepts but that have no effect,
	// each with the reason, sorted: the CLI shows them so that nothing is dropped
	// silently.
	Ignored []string `toml:"-" json:"ignored,omitempty"`
}

// Build is [build]: how the image is made. Fly's buildpack keys are refused.
type Build struct {
	Dockerfile string            `toml:"dockerfile" json:"dockerfile,omitempty"`
	Target     string            `toml:"build-target" json:"build-target,omitempty"`
	Image      string            `toml:"image" json:"image,omitempty"` // a prebuilt image: no build
	Ignorefile string            `toml:"ignorefile" json:"ignorefile,omitempty"`
	Args       map[string]string `toml:"args" json:"args,omitempty"`
}

// Experimental is [experimental]: what the machine runs, overriding the image.
type Experimental struct {
	Cmd        Words `toml:"cmd" json:"cmd,omitempty"`
	Entrypoint Words `toml:"entrypoint" json:"entrypoint,omitempty"`
	Exec       Words `toml:"exec" json:"exec,omitempty"`
}

// HTTPService is [http_service]: a service on public port 80 with handlers ["http"].
// Fly also serves it on 443 with TLS; kiln's proxy speaks plain HTTP only.
type HTTPService struct {
	InternalPort       int          `toml:"internal_port" json:"internal_port"`
	ForceHTTPS         bool         `toml:"force_https" json:"force_https,omitempty"` // ignored: no TLS
	AutoStopMachines   Autostop     `toml:"auto_stop_machines" json:"auto_stop_machines,omitempty"`
	AutoStartMachines  *bool        `toml:"auto_start_machines" json:"auto_start_machines,omitempty"`
	MinMachinesRunning int          `toml:"min_machines_running" json:"min_machines_running,omitempty"`
	Processes          []string     `toml:"processes" json:"processes,omitempty"`
	Concurrency        *Concurrency `toml:"concurrency" json:"concurrency,omitempty"`
	Checks             []HTTPCheck  `toml:"checks" json:"checks,omitempty"`
}

// Service is one [[services]] entry.
type Service struct {
	Protocol           string       `toml:"protocol" json:"protocol,omitempty"`
	InternalPort       int          `toml:"internal_port" json:"internal_port"`
	AutoStopMachines   Autostop     `toml:"auto_stop_machines" json:"auto_stop_machines,omitempty"`
	AutoStartMachines  *bool        `toml:"auto_start_machines" json:"auto_start_machines,omitempty"`
	MinMachinesRunning int          `toml:"min_machines_running" json:"min_machines_running,omitempty"`
	Ports              []Port       `toml:"ports" json:"ports,omitempty"`
	Concurrency        *Concurrency `toml:"concurrency" json:"concurrency,omitempty"`
	TCPChecks          []TCPCheck   `toml:"tcp_checks" json:"tcp_checks,omitempty"`
	HTTPChecks         []HTTPCheck  `toml:"http_checks" json:"http_checks,omitempty"`
	Processes          []string     `toml:"processes" json:"processes,omitempty"`
}

// Port is one [[services.ports]] entry.
type Port struct {
	Port       int      `toml:"port" json:"port"`
	Handlers   []string `toml:"handlers" json:"handlers,omitempty"`
	ForceHTTPS bool     `toml:"force_https" json:"force_https,omitempty"` // ignored: no TLS
}

// Concurrency is a service's load limits.
type Concurrency struct {
	Type      string `toml:"type" json:"type,omitempty"` // connections or requests
	SoftLimit int    `toml:"soft_limit" json:"soft_limit,omitempty"`
	HardLimit int    `toml:"hard_limit" json:"hard_limit,omitempty"`
}

// TCPCheck is a [[services.tcp_checks]] entry.
type TCPCheck struct {
	Interval     Duration `toml:"interval" json:"interval,omitempty"`
	Timeout      Duration `toml:"timeout" json:"timeout,omitempty"`
	GracePeriod  Duration `toml:"grace_period" json:"grace_period,omitempty"`
	RestartLimit int      `toml:"restart_limit" json:"restart_limit,omitempty"` // Fly's V1 apps only: ignored
}

// HTTPCheck is a [[services.http_checks]] or [[http_service.checks]] entry. kiln checks
// with GET over plain HTTP: method, protocol, TLS and headers are kept and ignored.
type HTTPCheck struct {
	TCPCheck
	Method        string            `toml:"method" json:"method,omitempty"`
	Path          string            `toml:"path" json:"path,omitempty"`
	Protocol      string            `toml:"protocol" json:"protocol,omitempty"`
	TLSSkipVerify bool              `toml:"tls_skip_verify" json:"tls_skip_verify,omitempty"`
	TLSServerName string            `toml:"tls_server_name" json:"tls_server_name,omitempty"`
	Headers       map[string]string `toml:"headers" json:"headers,omitempty"`
}

// Check is a top-level [checks.NAME]. kiln checks services' ports only: the check is
// attached to the service of its group whose internal_port is Port (by default the
// http_service's, as Fly does).
type Check struct {
	HTTPCheck
	Type      string   `toml:"type" json:"type"` // tcp or http
	Port      int      `toml:"port" json:"port,omitempty"`
	Processes []string `toml:"processes" json:"processes,omitempty"`
}

// Mount is a [mounts] entry: a volume of the app, by name, mounted at Destination.
type Mount struct {
	Source      string `toml:"source" json:"source"`
	Destination string `toml:"destination" json:"destination"`
	// InitialSize is "10gb", "500mb" or a bare number of GB (Fly's decimal units).
	InitialSize             Size     `toml:"initial_size" json:"initial_size,omitempty"`
	SnapshotRetention       int      `toml:"snapshot_retention" json:"snapshot_retention,omitempty"`                 // ignored
	ScheduledSnapshots      *bool    `toml:"scheduled_snapshots" json:"scheduled_snapshots,omitempty"`               // ignored
	AutoExtendSizeThreshold int      `toml:"auto_extend_size_threshold" json:"auto_extend_size_threshold,omitempty"` // ignored
	AutoExtendSizeIncrement Size     `toml:"auto_extend_size_increment" json:"auto_extend_size_increment,omitempty"` // ignored
	AutoExtendSizeLimit     Size     `toml:"auto_extend_size_limit" json:"auto_extend_size_limit,omitempty"`         // ignored
	Processes               []string `toml:"processes" json:"processes,omitempty"`
}

// VM is a [[vm]] entry: the size of a group's machines. Size is a preset; Memory
// ("1gb", "512mb", a bare number of MB), MemoryMB and CPUs override it, in that order.
type VM struct {
	Size      string   `toml:"size" json:"size,omitempty"`
	Memory    Size     `toml:"memory" json:"memory,omitempty"`
	MemoryMB  int      `toml:"memory_mb" json:"memory_mb,omitempty"`
	CPUs      int      `toml:"cpus" json:"cpus,omitempty"`
	CPUKind   string   `toml:"cpu_kind" json:"cpu_kind,omitempty"` // shared or performance; kept, no effect
	Processes []string `toml:"processes" json:"processes,omitempty"`
}

// Deploy is [deploy].
type Deploy struct {
	Strategy       string  `toml:"strategy" json:"strategy,omitempty"`
	MaxUnavailable float64 `toml:"max_unavailable" json:"max_unavailable,omitempty"`
	ReleaseCommand string  `toml:"release_command" json:"release_command,omitempty"`
	// ReleaseCommandTimeout and WaitTimeout are durations; the file may give seconds.
	ReleaseCommandTimeout string `toml:"-" json:"release_command_timeout,omitempty"`
	ReleaseCommandVM      *VM    `toml:"-" json:"release_command_vm,omitempty"`
	WaitTimeout           string `toml:"-" json:"wait_timeout,omitempty"`
}

// Restart is a [[restart]] entry.
type Restart struct {
	Policy    string   `toml:"policy" json:"policy"` // never, always or on-failure
	Retries   int      `toml:"retries" json:"retries,omitempty"`
	Processes []string `toml:"processes" json:"processes,omitempty"`
}

// File is a [[files]] entry. Parsed and checked, but kiln's machines cannot be given
// files yet: MachineConfig refuses a group that has one.
type File struct {
	GuestPath  string   `toml:"guest_path" json:"guest_path"`
	LocalPath  string   `toml:"local_path" json:"local_path,omitempty"`
	RawValue   string   `toml:"raw_value" json:"raw_value,omitempty"`
	SecretName string   `toml:"secret_name" json:"secret_name,omitempty"`
	Processes  []string `toml:"processes" json:"processes,omitempty"`
}

// Metrics is a [metrics] entry: accepted, no effect (kiln scrapes no app metrics).
type Metrics struct {
	Port      int      `toml:"port" json:"port,omitempty"`
	Path      string   `toml:"path" json:"path,omitempty"`
	HTTPS     bool     `toml:"https" json:"https,omitempty"`
	Processes []string `toml:"processes" json:"processes,omitempty"`
}

// Kiln is kiln.toml's own [kiln] table (also read from a fly.toml).
type Kiln struct {
	// Project is the build project; Parse fills in the app's name when it is empty.
	Project string `toml:"project" json:"project,omitempty"`
	// Counts is how many machines each process group gets on the app's first deploy.
	Counts map[string]int `toml:"counts" json:"counts,omitempty"`
}

// MaxFileBytes bounds a config file: it is read whole and stored in every release.
const MaxFileBytes = 1 << 20

// Bounds on what one config may ask: process groups, machines in a group (a count), and
// how long a deploy waits (wait_timeout, release_command_timeout), which holds the app's
// next deploy back.
const (
	MaxGroups  = 16
	MaxCount   = 100
	MaxTimeout = time.Hour
)

// Fly's defaults and names.
const (
	DefaultStrategy       = "rolling"
	DefaultMaxUnavailable = 0.33
	DefaultWaitTimeout    = 5 * time.Minute
	DefaultReleaseTimeout = 5 * time.Minute
	DefaultKillSignal     = "SIGINT"
	DefaultKillTimeout    = "5s"
	DefaultVMSize         = "shared-cpu-1x"
	DefaultReleaseVMSize  = "shared-cpu-2x"
	// AppGroup is the process group of an app without [processes].
	AppGroup = "app"
	// ReleaseCommandGroup is the group the release command's machine says it is in.
	ReleaseCommandGroup = "fly_app_release_command"
	// ProcessGroupMetadata is the metadata key, and ProcessGroupEnv the variable, that
	// name a machine's process group, as flyctl sets them.
	ProcessGroupMetadata = "fly_process_group"
	ProcessGroupEnv      = "FLY_PROCESS_GROUP"
)

// Fly's bounds on checks.
const (
	checkMinimum            = time.Second
	checkMaximum            = time.Minute
	topLevelIntervalMinimum = 2 * time.Second
)

// Strategies are the deploy strategies, as Fly names them.
var Strategies = []string{"rolling", "immediate", "canary", "bluegreen"}

// Load reads and parses a config file of at most MaxFileBytes.
func Load(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, errdefs.Wrap(kindOfOpen(err), err, "reading the app config")
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileBytes+1)) // one byte over: Parse refuses it
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "reading %s", path)
	}
	return Parse(path, data)
}

func kindOfOpen(err error) error {
	if os.IsNotExist(err) {
		return errdefs.ErrNotFound
	}
	return errdefs.ErrInvalid
}

// Groups is the app's process groups, sorted: [processes]'s names, or ["app"].
func (c *Config) Groups() []string {
	if len(c.Processes) == 0 {
		return []string{AppGroup}
	}
	names := make([]string, 0, len(c.Processes))
	for name := range c.Processes {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// DefaultGroup is the group that entries without a processes list apply to, as Fly
// decides it: "app" if there is one, else the first group by name.
func (c *Config) DefaultGroup() string {
	groups := c.Groups()
	if slices.Contains(groups, AppGroup) {
		return AppGroup
	}
	return groups[0]
}

// Strategy is the deploy strategy: "rolling" unless [deploy] says otherwise.
func (c *Config) Strategy() string {
	if c.Deploy.Strategy == "" {
		return DefaultStrategy
	}
	return c.Deploy.Strategy
}

// MaxUnavailable is how many of n machines may be down at once in a rolling deploy:
// max_unavailable as a fraction of n (0 < x < 1, rounded up) or as a count, by default
// Fly's 0.33; at least 1, at most n.
func (c *Config) MaxUnavailable(n int) int {
	x := c.Deploy.MaxUnavailable
	if x <= 0 {
		x = DefaultMaxUnavailable
	}
	if x >= float64(n) { // also what int() of a huge float would get wrong
		return max(1, n)
	}
	k := int(x)
	if x < 1 {
		k = int(math.Ceil(x * float64(n)))
	}
	return max(1, min(k, n))
}

// WaitTimeout is how long a deploy waits for a machine to be started and healthy
// before it gives up on the release: [deploy] wait_timeout, by default Fly's 5m.
func (c *Config) WaitTimeout() time.Duration {
	if d, err := time.ParseDuration(c.Deploy.WaitTimeout); err == nil && d > 0 {
		return min(d, MaxTimeout)
	}
	return DefaultWaitTimeout
}

// ReleaseCommandTimeout is how long the release command may run: by default Fly's 5m.
func (c *Config) ReleaseCommandTimeout() time.Duration {
	if d, err := time.ParseDuration(c.Deploy.ReleaseCommandTimeout); err == nil && d > 0 {
		return min(d, MaxTimeout)
	}
	return DefaultReleaseTimeout
}

// appliesTo says whether an entry with this processes list applies to group: a list
// names its groups; an empty one means the default group only, as Fly flattens it.
func (c *Config) appliesTo(processes []string, group string) bool {
	if len(processes) == 0 {
		return group == c.DefaultGroup()
	}
	return slices.Contains(processes, group)
}

func (c *Config) hasGroup(group string) bool {
	if len(c.Processes) == 0 {
		return group == AppGroup
	}
	_, ok := c.Processes[group]
	return ok
}
