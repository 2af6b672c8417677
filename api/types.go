// Package api holds the wire types of kiln's REST API: the Fly Machines shapes for apps,
// machines and their events, plus kiln's own endpoints (images, logs). No logic lives
// here; openapi.json beside it documents the same routes and is served at
// /v1/openapi.json.
package api

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/google/shlex"
)

// Error is the body of every error response, in Fly's shape: the message, and Fly's
// status word for clients that branch on it (insufficient_capacity for capacity,
// unknown for the rest).
type Error struct {
	Error  string `json:"error"`
	Status string `json:"status,omitempty"`
}

// CreateAppRequest is POST /v1/apps. Fly's documents name the app app_name; its current
// API and client say name: either is taken. The rest of Fly's fields are accepted and
// ignored: kiln has one organization and one network per host.
type CreateAppRequest struct {
	AppName          string `json:"app_name,omitempty"`
	Name             string `json:"name,omitempty"`
	OrgSlug          string `json:"org_slug,omitempty"`
	Network          string `json:"network,omitempty"`
	AppRoleID        string `json:"app_role_id,omitempty"`
	EnableSubdomains bool   `json:"enable_subdomains,omitempty"`
	IdempotencyKey   string `json:"idempotency_key,omitempty"`
}

// Organization is the one organization kiln has, for Fly's clients.
type Organization struct {
	Name string `json:"name"`
	Slug string `json:"slug"`
}

// App is an app, in Fly's shape.
type App struct {
	ID           string       `json:"id"`
	Name         string       `json:"name"`
	Status       string       `json:"status"` // deployed (a machine is started), pending otherwise
	Network      string       `json:"network"`
	Organization Organization `json:"organization"`
	MachineCount int          `json:"machine_count"`
	VolumeCount  int          `json:"volume_count"`
}

// AppList is GET /v1/apps.
type AppList struct {
	TotalApps int   `json:"total_apps"`
	Apps      []App `json:"apps"`
}

// Fields of Fly's that kiln accepts and does nothing with are typed Ignored: they are
// kept as sent (a Fly client reads its config back unchanged) and have no effect. Those
// kiln cannot honour and a workload would miss are typed Unsupported: any value but
// an empty one is refused by machine.Validate, naming the field. The README lists both.
type (
	Ignored     = json.RawMessage
	Unsupported = json.RawMessage
)

// Guest sizes a machine.
type Guest struct {
	CPUs             int         `json:"cpus,omitempty"`
	MemoryMB         int         `json:"memory_mb,omitempty"`
	CPUKind          string      `json:"cpu_kind,omitempty"` // ignored: every vCPU is a share of the host's
	HostDedicationID Ignored     `json:"host_dedication_id,omitempty"`
	PersistRootfs    Ignored     `json:"persist_rootfs,omitempty"`
	GPUs             Unsupported `json:"gpus,omitempty"`
	GPUKind          Unsupported `json:"gpu_kind,omitempty"`
	KernelArgs       Unsupported `json:"kernel_args,omitempty"`
}

// Init overrides what the image says to run.
type Init struct {
	Exec       []string    `json:"exec,omitempty"`
	Entrypoint []string    `json:"entrypoint,omitempty"`
	Cmd        []string    `json:"cmd,omitempty"`
	Tty        Ignored     `json:"tty,omitempty"`
	SwapSizeMB Ignored     `json:"swap_size_mb,omitempty"`
	KernelArgs Unsupported `json:"kernel_args,omitempty"`
}

// Mount attaches a volume.
type Mount struct {
	Volume                 string  `json:"volume"`
	Path                   string  `json:"path"`
	Name                   Ignored `json:"name,omitempty"`
	Encrypted              Ignored `json:"encrypted,omitempty"`
	SizeGB                 Ignored `json:"size_gb,omitempty"`
	ExtendThresholdPercent Ignored `json:"extend_threshold_percent,omitempty"`
	AddSizeGB              Ignored `json:"add_size_gb,omitempty"`
	SizeGBLimit            Ignored `json:"size_gb_limit,omitempty"`
}

// Restart is the restart policy.
type Restart struct {
	Policy      string  `json:"policy,omitempty"` // no, always, on-failure
	MaxRetries  int     `json:"max_retries,omitempty"`
	GPUBidPrice Ignored `json:"gpu_bid_price,omitempty"`
}

// StopConfig says how a machine is stopped.
type StopConfig struct {
	Timeout Duration `json:"timeout,omitempty"` // e.g. "10s"
	Signal  string   `json:"signal,omitempty"`
}

// Duration is a Go duration string ("10s"); a number is taken as nanoseconds, as Fly's
// client writes one.
type Duration string

// UnmarshalJSON takes a string or a number of nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var n json.Number
	if err := json.Unmarshal(b, &n); err == nil {
		ns, err := n.Int64()
		if err != nil {
			return fmt.Errorf("duration %s: want a string like \"10s\" or whole nanoseconds", n)
		}
		*d = Duration(time.Duration(ns).String())
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration %s: want a string like \"10s\"", b)
	}
	*d = Duration(s)
	return nil
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
	// Size is one of Fly's presets (shared-cpu-1x, performance-2x, ...): it sets
	// guest.cpus and guest.memory_mb where they are not given.
	Size string `json:"size,omitempty"`

	// Fly's fields that kiln keeps and ignores.
	Checks                  Ignored `json:"checks,omitempty"` // kiln's health checks are per service
	DNS                     Ignored `json:"dns,omitempty"`
	Metrics                 Ignored `json:"metrics,omitempty"`
	Standbys                Ignored `json:"standbys,omitempty"`
	DisableMachineAutostart Ignored `json:"disable_machine_autostart,omitempty"`

	// Files are written into the machine's filesystem before its workload starts.
	Files []File `json:"files,omitempty"`

	// Fly's fields that kiln refuses unless empty.
	Processes  Unsupported `json:"processes,omitempty"`
	Containers Unsupported `json:"containers,omitempty"`
	Volumes    Unsupported `json:"volumes,omitempty"`
	Statics    Unsupported `json:"statics,omitempty"`
	Schedule   Unsupported `json:"schedule,omitempty"`
}

// File is a file written into a machine before its workload starts, in Fly's shape:
// its contents are raw_value, or the app's secret secret_name, both base64.
type File struct {
	GuestPath  string  `json:"guest_path"`
	RawValue   *string `json:"raw_value,omitempty"`
	SecretName *string `json:"secret_name,omitempty"`
	// Mode is the file's permission bits (default 0644).
	Mode uint32 `json:"mode,omitempty"`
}

// Service is a port of the machine that kiln's proxy serves, in Fly's shape.
type Service struct {
	Protocol     string        `json:"protocol"` // tcp
	InternalPort int           `json:"internal_port"`
	Ports        []ServicePort `json:"ports,omitempty"`
	// Autostop is what the proxy does with a machine idle past the idle time: off (the
	// default), stop or suspend. Fly's true and false mean stop and off.
	Autostop Autostop `json:"autostop,omitempty"`
	// Autostart lets a request start or resume a machine of the app when none can take
	// it. Defaults to true when Autostop is on.
	Autostart          *bool        `json:"autostart,omitempty"`
	MinMachinesRunning int          `json:"min_machines_running,omitempty"`
	Concurrency        *Concurrency `json:"concurrency,omitempty"`
	Checks             []Check      `json:"checks,omitempty"`
	// Fly's routing hints, kept and ignored.
	ForceInstanceKey         Ignored `json:"force_instance_key,omitempty"`
	ForceInstanceDescription Ignored `json:"force_instance_description,omitempty"`
}

// Autostop is off, stop or suspend.
type Autostop string

// UnmarshalJSON takes Fly's booleans as well as the words.
func (a *Autostop) UnmarshalJSON(b []byte) error {
	var on bool
	if err := json.Unmarshal(b, &on); err == nil {
		*a = map[bool]Autostop{true: "stop", false: "off"}[on]
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("autostop %s: want off, stop, suspend, true or false", b)
	}
	*a = Autostop(s)
	return nil
}

// ServicePort is a public port of a service; handlers ["http"] routes it by Host.
type ServicePort struct {
	Port     int      `json:"port"`
	Handlers []string `json:"handlers,omitempty"`
	// Fly's TLS and HTTP options, kept and ignored: kiln's proxy speaks plain TCP and
	// HTTP/1.1.
	ForceHTTPS        Ignored `json:"force_https,omitempty"`
	TLSOptions        Ignored `json:"tls_options,omitempty"`
	HTTPOptions       Ignored `json:"http_options,omitempty"`
	ProxyProtoOptions Ignored `json:"proxy_proto_options,omitempty"`
	// Port ranges are refused: the proxy serves single ports.
	StartPort Unsupported `json:"start_port,omitempty"`
	EndPort   Unsupported `json:"end_port,omitempty"`
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
	// Fly's other check fields, kept and ignored: kiln checks the service's own port
	// with GET and no TLS.
	Port          Ignored `json:"port,omitempty"`
	Method        Ignored `json:"method,omitempty"`
	Protocol      Ignored `json:"protocol,omitempty"`
	TLSSkipVerify Ignored `json:"tls_skip_verify,omitempty"`
	TLSServerName Ignored `json:"tls_server_name,omitempty"`
	Headers       Ignored `json:"headers,omitempty"`
}

// CreateMachineRequest is POST /v1/apps/{app}/machines, and an update's body.
type CreateMachineRequest struct {
	Name   string        `json:"name,omitempty"`
	Region string        `json:"region,omitempty"` // ignored: kiln places by capacity
	Config MachineConfig `json:"config"`
	// NoCapacityWait fails the request at once, naming the resource, when the machine
	// does not fit now, instead of queueing its start.
	NoCapacityWait bool `json:"no_capacity_wait,omitempty"`
	// SkipLaunch records the machine (or its new config) without starting it.
	SkipLaunch bool `json:"skip_launch,omitempty"`
	// SkipServiceRegistration creates the machine cordoned: the proxy sends it nothing
	// until it is uncordoned (Fly's blue-green deploys do so once checks pass).
	SkipServiceRegistration bool `json:"skip_service_registration,omitempty"`
	// LeaseTTL, in seconds, creates the machine with a lease held; its nonce comes back
	// in the machine's nonce field.
	LeaseTTL int `json:"lease_ttl,omitempty"`
	// CurrentVersion, on an update, refuses it if the machine has changed since.
	CurrentVersion string `json:"current_version,omitempty"`
	// Fly's fields that kiln accepts and ignores: kiln has no secrets store or LSVD.
	SkipSecrets       Ignored `json:"skip_secrets,omitempty"`
	MinSecretsVersion Ignored `json:"min_secrets_version,omitempty"`
	LSVD              Ignored `json:"lsvd,omitempty"`
}

// Event is one entry of a machine's journal, in Fly's shape.
type Event struct {
	ID        string        `json:"id"`
	Type      string        `json:"type"`
	Status    string        `json:"status"`
	Source    string        `json:"source"`
	Timestamp int64         `json:"timestamp"` // Unix milliseconds, as Fly reports
	Message   string        `json:"message,omitempty"`
	Request   *EventRequest `json:"request,omitempty"`
}

// EventRequest is what an event carries beyond its type.
type EventRequest struct {
	ExitEvent *ExitEvent `json:"exit_event,omitempty"`
}

// ExitEvent carries a workload's exit.
type ExitEvent struct {
	ExitCode      int       `json:"exit_code"`
	GuestExitCode int       `json:"guest_exit_code"`
	ExitedAt      time.Time `json:"exited_at"`
}

// ImageRef is the image a machine runs, as Fly shows it.
type ImageRef struct {
	Registry   string `json:"registry"`
	Repository string `json:"repository"`
	Tag        string `json:"tag,omitempty"`
	Digest     string `json:"digest,omitempty"`
}

// Machine is a machine as the API shows it, in Fly's shape.
type Machine struct {
	ID    string `json:"id"`
	Name  string `json:"name"`
	State string `json:"state"`
	// Region is always "local": kiln has hosts, not regions (Host says which).
	Region string `json:"region"`
	// Version names the machine's current config; InstanceID is the same value, as
	// Fly's clients wait on either.
	Version    string         `json:"version"`
	InstanceID string         `json:"instance_id"`
	Config     *MachineConfig `json:"config,omitempty"` // left out by list's summary=true
	ImageRef   *ImageRef      `json:"image_ref,omitempty"`
	ExitCode   *int           `json:"exit_code,omitempty"`
	Cordoned   bool           `json:"cordoned,omitempty"`
	PrivateIP  string         `json:"private_ip,omitempty"`
	HostStatus string         `json:"host_status,omitempty"` // ok, or unreachable when its host is down
	// Nonce is the lease taken by a create with lease_ttl.
	Nonce     string    `json:"nonce,omitempty"`
	Host      string    `json:"host,omitempty"` // the host that runs it, when hosts share a database
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
	Events    []Event   `json:"events,omitempty"`
}

// StartResponse answers POST .../start.
type StartResponse struct {
	PreviousState string `json:"previous_state"`
}

// StopRequest is POST .../stop. Fly's client also sends the machine's id, which must be
// this machine's if given.
type StopRequest struct {
	ID      string   `json:"id,omitempty"`
	Signal  string   `json:"signal,omitempty"`
	Timeout Duration `json:"timeout,omitempty"` // "0s" or none: the config's stop_config
}

// WaitResponse answers GET .../wait.
type WaitResponse struct {
	OK      bool   `json:"ok"`
	State   string `json:"state"`
	Version string `json:"version"`
}

// Argv is a command as a list, or (Fly's deprecated form) as one string, split as a
// shell would split it without expanding anything.
type Argv []string

// UnmarshalJSON takes a list, or a string split by github.com/google/shlex (the splitter
// BuildKit's Dockerfile parser uses, already in kiln's module graph).
func (a *Argv) UnmarshalJSON(b []byte) error {
	var list []string
	if err := json.Unmarshal(b, &list); err == nil {
		*a = list
		return nil
	}
	var line string
	if err := json.Unmarshal(b, &line); err != nil {
		return fmt.Errorf("cmd %s: want a list of strings or one command line", b)
	}
	words, err := shlex.Split(line)
	if err != nil {
		return fmt.Errorf("cmd %q: %v (quote it as a shell would, or send command as a list)", line, err)
	}
	*a = words
	return nil
}

// ExecRequest is POST .../exec.
type ExecRequest struct {
	Cmd       Argv     `json:"cmd,omitempty"`
	Command   []string `json:"command,omitempty"`
	Container string   `json:"container,omitempty"` // Fly's containers: only "" is accepted
	Timeout   int      `json:"timeout,omitempty"`   // seconds
	Stdin     string   `json:"stdin,omitempty"`
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

// CreateVolumeRequest is POST /v1/apps/{app}/volumes: every field of Fly's
// (fly.CreateVolumeRequest), which its client sends as null when unset.
type CreateVolumeRequest struct {
	Name string `json:"name"`
	// SizeGB defaults to the size of the snapshot or source volume, or else 1.
	SizeGB *int `json:"size_gb,omitempty"`
	// SnapshotID restores a snapshot of one of the app's volumes into the new volume.
	SnapshotID *string `json:"snapshot_id,omitempty"`
	// SourceVolumeID forks one of the app's volumes: the new one starts as its copy.
	SourceVolumeID *string `json:"source_volume_id,omitempty"`
	// SnapshotRetention is how many days snapshots are kept (default 5).
	SnapshotRetention *int `json:"snapshot_retention,omitempty"`
	// AutoBackupEnabled takes a snapshot a day (default off in kiln).
	AutoBackupEnabled *bool `json:"auto_backup_enabled,omitempty"`
	// FSType may only be ext4: kiln volumes are ext4 images.
	FSType *string `json:"fstype,omitempty"`
	// Accepted from Fly's clients and ignored: one host has one region and one zone,
	// and volumes are not encrypted by kiln (README: accepted and ignored fields).
	Region            string          `json:"region,omitempty"`
	Encrypted         *bool           `json:"encrypted,omitempty"`
	RequireUniqueZone *bool           `json:"require_unique_zone,omitempty"`
	UniqueZoneAppWide *bool           `json:"unique_zone_app_wide,omitempty"`
	MachinesOnly      *bool           `json:"machines_only,omitempty"`
	Compute           json.RawMessage `json:"compute,omitempty"`
	ComputeImage      string          `json:"compute_image,omitempty"`
}

// UpdateVolumeRequest is PUT (or POST) /v1/apps/{app}/volumes/{id}; null leaves a
// setting as it is.
type UpdateVolumeRequest struct {
	SnapshotRetention *int  `json:"snapshot_retention,omitempty"`
	AutoBackupEnabled *bool `json:"auto_backup_enabled,omitempty"`
}

// Snapshot is a point-in-time copy of a volume, in Fly's shape (fly.VolumeSnapshot)
// with kiln's volume_id.
type Snapshot struct {
	ID       string `json:"id"`
	VolumeID string `json:"volume_id"`
	// Size is what the snapshot takes on disk; VolumeSize the volume's size, in bytes.
	Size       int64 `json:"size"`
	VolumeSize int64 `json:"volume_size"`
	// Digest is empty: kiln does not hash snapshots.
	Digest        string    `json:"digest"`
	CreatedAt     time.Time `json:"created_at"`
	Status        string    `json:"status"`
	RetentionDays *int      `json:"retention_days"`
}

// Volume is a named persistent disk, in Fly's shape (fly.Volume) with kiln's used_bytes.
type Volume struct {
	ID                string    `json:"id"`
	Name              string    `json:"name"`
	State             string    `json:"state"`
	SizeGB            int       `json:"size_gb"`
	Region            string    `json:"region"`
	Zone              string    `json:"zone"`
	Encrypted         bool      `json:"encrypted"`
	FSType            string    `json:"fstype"`
	AttachedMachineID *string   `json:"attached_machine_id"`
	AttachedAllocID   *string   `json:"attached_alloc_id"`
	CreatedAt         time.Time `json:"created_at"`
	SnapshotRetention int       `json:"snapshot_retention"`
	AutoBackupEnabled bool      `json:"auto_backup_enabled"`
	HostStatus        string    `json:"host_status"`
	// UsedBytes is what the filesystem holds, as its superblock last said.
	UsedBytes int64 `json:"used_bytes"`
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
	Signal Signal `json:"signal"`
}

// Signal is a signal's name (SIGTERM) or number (15, as Fly's client sends a kill).
type Signal string

// UnmarshalJSON takes a name or a number.
func (s *Signal) UnmarshalJSON(b []byte) error {
	var n int
	if err := json.Unmarshal(b, &n); err == nil {
		*s = Signal(fmt.Sprint(n))
		return nil
	}
	var name string
	if err := json.Unmarshal(b, &name); err != nil {
		return fmt.Errorf("signal %s: want a name like SIGTERM or a number", b)
	}
	*s = Signal(name)
	return nil
}

// LeaseRequest is POST .../lease (ttl may come as a query parameter instead).
type LeaseRequest struct {
	TTL         int    `json:"ttl,omitempty"` // seconds
	Description string `json:"description,omitempty"`
}

// LeaseResponse is Fly's envelope around a lease.
type LeaseResponse struct {
	Status string `json:"status"` // success
	Data   *Lease `json:"data"`
}

// Lease is a held lease; mutating calls send its nonce in the fly-machine-lease-nonce
// header while it lasts.
type Lease struct {
	Nonce       string `json:"nonce"`
	ExpiresAt   int64  `json:"expires_at"` // Unix seconds
	Owner       string `json:"owner"`
	Description string `json:"description,omitempty"`
	Version     string `json:"version"` // the machine's version when the lease was read
}

// MetadataValue is POST .../metadata/{key}.
type MetadataValue struct {
	Value     string  `json:"value"`
	UpdatedAt Ignored `json:"updated_at,omitempty"`
}

// MetadataUpdate is PUT or PATCH .../metadata: keys to set, and (null or "") to remove.
type MetadataUpdate struct {
	Metadata map[string]*string `json:"metadata"`
	// MachineVersion, if given, refuses the update when the machine has changed since.
	MachineVersion string  `json:"machine_version,omitempty"`
	UpdatedAt      Ignored `json:"updated_at,omitempty"`
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
	CacheReset bool `json:"cache_reset,omitempty"`
	// ImageSentBytes is what the builder sent of the image: the blobs missing from the
	// project's last image (for a rebuild with no change, a new config and manifest).
	ImageSentBytes int64 `json:"image_sent_bytes,omitempty"`
	DurationMS     int64 `json:"duration_ms,omitempty"`
	LogTruncated   bool  `json:"log_truncated,omitempty"`
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

// ProcessStat is one process running in a machine's guest (GET …/ps), in Fly's shape.
// The guest's agent reads it from /proc; kernel threads are left out, and the list holds
// at most 4096 processes with command and directory cut to 1 KiB.
type ProcessStat struct {
	PID int32 `json:"pid"`
	// Stime is when the process started, Unix seconds by the guest's clock.
	Stime uint64 `json:"stime"`
	// Rtime is how long it has run, in seconds.
	Rtime uint64 `json:"rtime"`
	// Command is its argv joined by spaces; [name] for one without argv (a zombie).
	Command   string `json:"command"`
	Directory string `json:"directory"`
	// CPU is the CPU time it has used, user and system, in milliseconds.
	CPU uint64 `json:"cpu"`
	// RSS is its resident memory in bytes.
	RSS           uint64         `json:"rss"`
	ListenSockets []ListenSocket `json:"listen_sockets"`
}

// ListenSocket is a socket a process listens on: Proto "tcp" (in LISTEN) or "udp"
// (unconnected), Address host:port, [::]:80 for IPv6.
type ListenSocket struct {
	Proto   string `json:"proto"`
	Address string `json:"address"`
}
