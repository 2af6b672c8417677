// Package api holds the wire types of kiln's REST API: the Fly Machines shapes for apps,
// machines and their events, plus kiln's own endpoints (images, logs). No logic lives
// here; openapi.json beside it documents the same routes and is served at
// /v1/openapi.json.
package api

import (
	"time"
)

// Error is the body of every error response.
type Error struct {
	Error string `json:"error"`
}

// CreateAppRequest is POST /v1/apps.
type CreateAppRequest struct {
	AppName string `json:"app_name"`
}

// App is an app.
type App struct {
	Name string `json:"name"`
}

// Guest sizes a machine.
type Guest struct {
	CPUs     int    `json:"cpus,omitempty"`
	MemoryMB int    `json:"memory_mb,omitempty"`
	CPUKind  string `json:"cpu_kind,omitempty"`
}

// Init overrides what the image says to run.
type Init struct {
	Exec       []string `json:"exec,omitempty"`
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
}

// Mount attaches a volume.
type Mount struct {
	Volume string `json:"volume"`
	Path   string `json:"path"`
}

// Restart is the restart policy.
type Restart struct {
	Policy     string `json:"policy,omitempty"` // no, always, on-failure
	MaxRetries int    `json:"max_retries,omitempty"`
}

// StopConfig says how a machine is stopped.
type StopConfig struct {
	Timeout string `json:"timeout,omitempty"` // a Go duration, e.g. "10s"
	Signal  string `json:"signal,omitempty"`
}

// MachineConfig is a machine's configuration, with Fly's field names.
type MachineConfig struct {
	Image       string            `json:"image"`
	Env         map[string]string `json:"env,omitempty"`
	Init        Init              `json:"init,omitempty"`
	Guest       Guest             `json:"guest,omitempty"`
	Mounts      []Mount           `json:"mounts,omitempty"`
	Restart     Restart           `json:"restart,omitempty"`
	AutoDestroy bool              `json:"auto_destroy,omitempty"`
	Metadata    map[string]string `json:"metadata,omitempty"`
	StopConfig  *StopConfig       `json:"stop_config,omitempty"`
	Services    []Service         `json:"services,omitempty"`
}

// Service is a port of the machine that kiln's proxy serves, in Fly's shape.
type Service struct {
	Protocol     string        `json:"protocol"` // tcp
	InternalPort int           `json:"internal_port"`
	Ports        []ServicePort `json:"ports,omitempty"`
	// Autostop is what the proxy does with a machine idle past the idle time: off (the
	// default), stop or suspend.
	Autostop string `json:"autostop,omitempty"`
	// Autostart lets a request start or resume a machine of the app when none can take
	// it. Defaults to true when Autostop is on.
	Autostart          *bool        `json:"autostart,omitempty"`
	MinMachinesRunning int          `json:"min_machines_running,omitempty"`
	Concurrency        *Concurrency `json:"concurrency,omitempty"`
	Checks             []Check      `json:"checks,omitempty"`
}

// ServicePort is a public port of a service; handlers ["http"] routes it by Host.
type ServicePort struct {
	Port     int      `json:"port"`
	Handlers []string `json:"handlers,omitempty"`
}

// Concurrency limits the load one machine takes: past the soft limit the proxy prefers
// other machines (and starts one); at the hard limit it sends nothing more.
type Concurrency struct {
	Type      string `json:"type"` // connections or requests
	SoftLimit int    `json:"soft_limit"`
	HardLimit int    `json:"hard_limit"`
}

// Check is a health check; a machine failing one gets no traffic.
type Check struct {
	Type        string `json:"type"` // tcp or http
	Interval    string `json:"interval,omitempty"`
	Timeout     string `json:"timeout,omitempty"`
	GracePeriod string `json:"grace_period,omitempty"`
	Path        string `json:"path,omitempty"` // http only
}

// CreateMachineRequest is POST /v1/apps/{app}/machines.
type CreateMachineRequest struct {
	Name   string        `json:"name,omitempty"`
	Region string        `json:"region,omitempty"`
	Config MachineConfig `json:"config"`
	// NoCapacityWait fails the request at once, naming the resource, when the machine
	// does not fit now, instead of queueing its start.
	NoCapacityWait bool `json:"no_capacity_wait,omitempty"`
}

// Event is one entry of a machine's journal.
type Event struct {
	Type      string `json:"type"`
	Status    string `json:"status"`
	Source    string `json:"source"`
	Timestamp int64  `json:"timestamp"` // Unix milliseconds, as Fly reports
	Message   string `json:"message,omitempty"`
	Request   *struct {
		ExitEvent *ExitEvent `json:"exit_event,omitempty"`
	} `json:"request,omitempty"`
}

// ExitEvent carries a workload's exit.
type ExitEvent struct {
	ExitCode int `json:"exit_code"`
}

// Machine is a machine as the API shows it.
type Machine struct {
	ID         string        `json:"id"`
	Name       string        `json:"name"`
	State      string        `json:"state"`
	Region     string        `json:"region"`
	InstanceID string        `json:"instance_id"`
	Config     MachineConfig `json:"config"`
	ExitCode   *int          `json:"exit_code,omitempty"`
	Version    int           `json:"version"`
	Cordoned   bool          `json:"cordoned,omitempty"`
	PrivateIP  string        `json:"private_ip,omitempty"`
	Host       string        `json:"host,omitempty"` // the host that runs it, when hosts share a database
	CreatedAt  time.Time     `json:"created_at"`
	UpdatedAt  time.Time     `json:"updated_at"`
	Events     []Event       `json:"events,omitempty"`
}

// StopRequest is POST .../stop.
type StopRequest struct {
	Signal  string `json:"signal,omitempty"`
	Timeout string `json:"timeout,omitempty"`
}

// ExecRequest is POST .../exec.
type ExecRequest struct {
	Cmd     []string `json:"cmd,omitempty"`
	Command []string `json:"command,omitempty"`
	Timeout int      `json:"timeout,omitempty"` // seconds
	Stdin   string   `json:"stdin,omitempty"`
	// TTY runs the command on a terminal of Rows × Cols; stderr then arrives on stdout.
	// It is meant for a streaming exec (Upgrade: kiln-exec).
	TTY  bool   `json:"tty,omitempty"`
	Rows uint16 `json:"rows,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
}

// ExecResponse answers an exec.
type ExecResponse struct {
	ExitCode   int    `json:"exit_code"`
	ExitSignal int    `json:"exit_signal,omitempty"`
	Stdout     string `json:"stdout"`
	Stderr     string `json:"stderr"`
	// Truncated says stdout or stderr passed the exec.output limit and only its start is
	// here; the command still ran to its end. A streaming exec has no such limit.
	Truncated bool `json:"truncated,omitempty"`
}

// ExecUpgrade is the Upgrade token that turns POST .../exec into a streaming exec: the
// server answers 101 Switching Protocols and the connection carries exec frames.
const ExecUpgrade = "kiln-exec"

// Frame types of a streaming exec. Every frame is one type byte, a 4-byte big-endian
// payload length, then the payload (at most ExecFrameMax bytes).
const (
	// FrameStdin (client → server) carries input; an empty one closes the command's stdin.
	FrameStdin byte = 0
	// FrameStdout and FrameStderr (server → client) carry output.
	FrameStdout byte = 1
	FrameStderr byte = 2
	// FrameResize (client → server) is a JSON WinSize: the terminal's new size.
	FrameResize byte = 3
	// FrameSignal (client → server) is a JSON ExecSignalRequest.
	FrameSignal byte = 4
	// FrameExit (server → client) is a JSON ExecExit, the last frame.
	FrameExit byte = 5
	// FrameError (server → client) is a message saying why the exec failed; the last frame.
	FrameError byte = 6
)

// ExecFrameMax is the largest payload of one exec frame.
const ExecFrameMax = 64 << 10

// WinSize is a terminal's size.
type WinSize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// ExecSignalRequest delivers a signal to a streaming exec's process.
type ExecSignalRequest struct {
	Signal int `json:"signal"`
}

// ExecExit ends a streaming exec.
type ExecExit struct {
	// ExitCode is the exit code, or 128+signal when a signal ended the process.
	ExitCode   int  `json:"exit_code"`
	ExitSignal int  `json:"exit_signal,omitempty"`
	TimedOut   bool `json:"timed_out,omitempty"`
}

// LogLine is one line of a machine's workload output (NDJSON on the logs endpoint).
type LogLine struct {
	Timestamp time.Time `json:"timestamp"`
	Stream    string    `json:"stream"` // stdout, stderr
	Message   string    `json:"message"`
}

// ImageLoadResponse answers POST /v1/images.
type ImageLoadResponse struct {
	Digest string   `json:"digest"`
	Refs   []string `json:"refs"`
}

// OK is the body of calls that only succeed.
type OK struct {
	OK bool `json:"ok"`
}

// CreateVolumeRequest is POST /v1/apps/{app}/volumes.
type CreateVolumeRequest struct {
	Name   string `json:"name"`
	SizeGB int    `json:"size_gb"`
	Region string `json:"region,omitempty"`
	// SnapshotID restores a snapshot of one of the app's volumes into the new volume.
	SnapshotID string `json:"snapshot_id,omitempty"`
}

// Snapshot is a point-in-time copy of a volume.
type Snapshot struct {
	ID        string    `json:"id"`
	VolumeID  string    `json:"volume_id"`
	SizeBytes int64     `json:"size"`
	CreatedAt time.Time `json:"created_at"`
}

// Volume is a named persistent disk.
type Volume struct {
	ID                string    `json:"id"`
	Name              string    `json:"name"`
	State             string    `json:"state"`
	SizeGB            int       `json:"size_gb"`
	Region            string    `json:"region"`
	AttachedMachineID string    `json:"attached_machine_id,omitempty"`
	UsedBytes         int64     `json:"used_bytes"`
	CreatedAt         time.Time `json:"created_at"`
}

// ExtendVolumeRequest is PUT .../volumes/{id}/extend.
type ExtendVolumeRequest struct {
	SizeGB int `json:"size_gb"`
}

// ExtendVolumeResponse says whether the machine must restart to see the new size.
type ExtendVolumeResponse struct {
	Volume       Volume `json:"volume"`
	NeedsRestart bool   `json:"needs_restart"`
}

// SignalRequest is POST .../signal.
type SignalRequest struct {
	Signal string `json:"signal"` // e.g. SIGTERM, or a number
}

// LeaseRequest is POST .../lease.
type LeaseRequest struct {
	TTL         int    `json:"ttl,omitempty"` // seconds
	Description string `json:"description,omitempty"`
}

// Lease is a held lease; mutating calls send its nonce in the fly-machine-lease-nonce
// header while it lasts.
type Lease struct {
	Nonce       string `json:"nonce"`
	ExpiresAt   int64  `json:"expires_at"` // Unix seconds
	Description string `json:"description,omitempty"`
}

// MetadataValue is POST .../metadata/{key}.
type MetadataValue struct {
	Value string `json:"value"`
}

// LeaseHeader carries a lease's nonce.
const LeaseHeader = "fly-machine-lease-nonce"

// BuildSpec is what a build is asked to do; the context travels beside it.
type BuildSpec struct {
	// Dockerfile is the Dockerfile's path inside the context (default "Dockerfile").
	Dockerfile string            `json:"dockerfile,omitempty"`
	Target     string            `json:"target,omitempty"`
	Tags       []string          `json:"tags,omitempty"`
	BuildArgs  map[string]string `json:"build_args,omitempty"`
	Labels     map[string]string `json:"labels,omitempty"`
	// Branch, when set, lets a newer build of the same project and branch cancel this
	// one (unless NoSupersede).
	Branch string `json:"branch,omitempty"`
	// GitURL, when set, is where the context comes from (kiln clones it on the host,
	// at GitRef: a branch, tag or commit); the request's context part is then empty.
	GitURL      string `json:"git_url,omitempty"`
	GitRef      string `json:"git_ref,omitempty"`
	NoSupersede bool   `json:"no_supersede,omitempty"`
	// SecretIDs names the secrets sent with the request; their values are never stored.
	SecretIDs []string `json:"secret_ids,omitempty"`
}

// StepTiming is one build step as BuildKit reported it.
type StepTiming struct {
	Name   string `json:"name"`
	Cached bool   `json:"cached"`
	Millis int64  `json:"ms"`
}

// Build is a build as the API shows it.
type Build struct {
	ID      string    `json:"id"`
	Project string    `json:"project"`
	State   string    `json:"state"` // queued, running, succeeded, failed, canceled
	Spec    BuildSpec `json:"spec"`
	// Attempt counts the runs so far; infrastructure failures are retried.
	Attempt int `json:"attempt"`
	// QueuePosition is the build's place among queued builds (1 = next), while queued.
	QueuePosition int `json:"queue_position,omitempty"`
	// Host runs (or last ran) the build, when hosts share a database.
	Host string `json:"host,omitempty"`
	BuildResult
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// BuildResult is what a build did.
type BuildResult struct {
	Image  string   `json:"image,omitempty"` // digest in kiln's registry
	Pushed []string `json:"pushed,omitempty"`
	Error  string   `json:"error,omitempty"`
	// Failure says whose failure ended the build: "code" (the Dockerfile or a step) or
	// "infrastructure" (after the retries).
	Failure string `json:"failure,omitempty"`
	// Retries explains each infrastructure failure that was retried.
	Retries      []string     `json:"retries,omitempty"`
	CachedSteps  int          `json:"cached_steps"`
	TotalSteps   int          `json:"total_steps"`
	Steps        []StepTiming `json:"steps,omitempty"`
	BuilderReady int64        `json:"builder_ready_ms,omitempty"` // 0: the builder was warm
	// Builder says how the builder was found: cold (booted), resumed (from a suspend)
	// or warm (running).
	Builder string `json:"builder,omitempty"`
	// CacheReset says the project's cache was emptied before this build: its last
	// builder had not stopped cleanly.
	CacheReset   bool  `json:"cache_reset,omitempty"`
	DurationMS   int64 `json:"duration_ms,omitempty"`
	LogTruncated bool  `json:"log_truncated,omitempty"`
	// Pruned says the image was deleted from the registry: newer builds replaced it.
	Pruned bool `json:"pruned,omitempty"`
}

// BuildCache describes a project's build cache volume.
type BuildCache struct {
	Project   string `json:"project"`
	Path      string `json:"path"`
	SizeBytes int64  `json:"size_bytes"`
	UsedBytes int64  `json:"used_bytes"`
	// KeepBytes is BuildKit's GC target; above ResetAbove of the volume after a build,
	// the cache is reset.
	KeepBytes  int64   `json:"keep_bytes"`
	ResetAbove float64 `json:"reset_above"`
	Resets     int     `json:"resets"`  // since the server started
	Builder    string  `json:"builder"` // running, suspended, stopped or none
}

// PruneResponse says what a prune freed.
type PruneResponse struct {
	FreedBytes int64 `json:"freed_bytes"`
}

// Limit is one limit the server enforces.
type Limit struct {
	Name        string `json:"name"`
	Value       string `json:"value"`
	Unit        string `json:"unit,omitempty"`
	Source      string `json:"source"`
	Description string `json:"description"`
}

// Host is a host's capacity: what it has, what it offers after the reserve and the
// overcommit ratios, and what running machines and builders hold.
type Host struct {
	Name             string  `json:"name"`
	State            string  `json:"state"` // up, cordoned
	CPUs             int     `json:"cpus"`
	MemoryMiB        int     `json:"memory_mib"`
	CPUOvercommit    float64 `json:"cpu_overcommit"`
	MemoryOvercommit float64 `json:"memory_overcommit"`
	ReserveCPUs      int     `json:"reserve_cpus"`
	ReserveMemoryMiB int     `json:"reserve_memory_mib"`
	CPUsOffered      int     `json:"cpus_offered"`
	MemoryOfferedMiB int     `json:"memory_offered_mib"`
	CPUsUsed         int     `json:"cpus_used"`
	MemoryUsedMiB    int     `json:"memory_used_mib"`
}

// DrainReport says what draining a host did with each of its machines.
type DrainReport struct {
	Host  string       `json:"host"`
	Moved []DrainEntry `json:"moved"`
	Kept  []DrainEntry `json:"kept"`
}

// DrainEntry is one machine in a drain report: where it went, or why it stayed.
type DrainEntry struct {
	Machine string `json:"machine"`
	To      string `json:"to,omitempty"`
	Why     string `json:"why,omitempty"`
}
