// Package store is kiln's persistence: the records the services keep and the Store
// interface they use. Adapters live below it (sqlstore: SQLite on one host; PostgreSQL
// for clusters behind the same interface). A machine's state changes only through
// Store.Transition, which compares and swaps the state and appends the event in one
// transaction.
package store

import (
	"context"

	"encoding/json"
	"time"

	"github.com/kilnhq/kiln/internal/capacity"

	"github.com/kilnhq/kiln/internal/machine"
)

// Machine is a machine's record.
type Machine struct {
	ID       string          `json:"id"`
	App      string          `json:"app"`
	Name     string          `json:"name"`
	State    machine.State   `json:"state"`
	Config   json.RawMessage `json:"config"`
	Version  int             `json:"version"`
	ExitCode *int            `json:"exit_code,omitempty"`
	Restarts int             `json:"restarts"`
	Cordoned bool            `json:"cordoned"`
	// Host runs the machine; "" on a database only one host uses.
	Host      string    `json:"host,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// RunsOn says whether host runs the machine: the host it is placed on, or any host for a
// machine of a database only one host uses (no host recorded).
func (m Machine) RunsOn(host string) bool { return m.Host == "" || m.Host == host }

// Lease is an exclusive claim on a machine: while it holds, changes need its nonce.
type Lease struct {
	Nonce       string    `json:"nonce"`
	ExpiresAt   time.Time `json:"expires_at"`
	Description string    `json:"description,omitempty"`
	// Owner is the ID of the token that took it.
	Owner string `json:"owner,omitempty"`
}

// Volume is a named persistent disk of an app.
type Volume struct {
	ID              string    `json:"id"`
	App             string    `json:"app"`
	Name            string    `json:"name"`
	SizeBytes       int64     `json:"size_bytes"`
	Path            string    `json:"path"`
	AttachedMachine string    `json:"attached_machine,omitempty"`
	CreatedAt       time.Time `json:"created_at"`
	// SnapshotRetention is how many days the volume's snapshots are kept.
	SnapshotRetention int `json:"snapshot_retention"`
	// AutoBackup takes a snapshot of the volume a day.
	AutoBackup bool `json:"auto_backup_enabled"`
}

// Snapshot is a point-in-time copy of a volume.
type Snapshot struct {
	ID       string `json:"id"`
	VolumeID string `json:"volume_id"`
	Path     string `json:"path"`
	// SizeBytes is the volume's size when the snapshot was taken; StoredBytes what the
	// snapshot's file takes on disk.
	SizeBytes   int64 `json:"size_bytes"`
	StoredBytes int64 `json:"stored_bytes"`
	// CreatedAt is set by AddSnapshot when zero.
	CreatedAt time.Time `json:"created_at"`
	// RetentionDays is its volume's SnapshotRetention, filled in by the reads.
	RetentionDays int `json:"retention_days"`
}

// Store persists apps, machines and their event journals.
type Store interface {
	// CreateApp creates an app; an existing one is ErrConflict.
	CreateApp(ctx context.Context, name string) error
	// ListApps lists app names, sorted.
	ListApps(ctx context.Context) ([]string, error)
	// DeleteApp removes an app with its destroyed machines' records. An app that still
	// has a machine not destroyed, or a volume, is ErrConflict; an unknown one
	// ErrNotFound.
	DeleteApp(ctx context.Context, name string) error
	// CreateMachine inserts m (its state must be created) with its launch event, and
	// attaches the volumes (by ID) to it, all in one transaction: a volume is never held by
	// a machine that does not exist. A volume another machine holds is ErrConflict, and
	// then nothing is created.
	CreateMachine(ctx context.Context, m Machine, ev machine.Event, volumes ...string) error
	GetMachine(ctx context.Context, id string) (Machine, error)
	// ListMachines lists an app's machines, oldest first; an unknown app is ErrNotFound.
	ListMachines(ctx context.Context, app string) ([]Machine, error)
	// AllMachines lists every machine of every app and host, destroyed ones too, oldest
	// first: one query where a caller must see them all (public ports, the proxy's
	// targets, recovery).
	AllMachines(ctx context.Context) ([]Machine, error)
	// Transition moves a machine from → to if the transition table allows it and the
	// machine is still in from, and appends ev, atomically. Otherwise it changes nothing
	// and returns ErrConflict (or ErrNotFound).
	Transition(ctx context.Context, id string, from, to machine.State, ev machine.Event) error
	// Note appends an event that changes no state (its status is the current state).
	Note(ctx context.Context, id string, ev machine.Event) error
	// Events returns a machine's journal, oldest first.
	Events(ctx context.Context, id string) ([]machine.Event, error)

	// UpdateConfig replaces a stopped machine's config, making version+1, and records an
	// update event, if the machine is still at version (the one the new config was made
	// from); otherwise it is ErrConflict and nothing changes, so that of two concurrent
	// updates neither is lost without its caller knowing.
	UpdateConfig(ctx context.Context, id string, version int, config []byte) error
	SetCordoned(ctx context.Context, id string, cordoned bool) error
	// Lease returns the machine's lease; a zero Lease if none holds.
	Lease(ctx context.Context, id string) (Lease, error)
	// SetLease takes the lease if none holds (or it expired) or if holder matches the
	// current nonce; otherwise ErrConflict. A zero l releases it.
	SetLease(ctx context.Context, id, holder string, l Lease) error
	Metadata(ctx context.Context, id string) (map[string]string, error)
	// AppMetadata is the metadata of every machine of an app, by machine ID, in one read.
	AppMetadata(ctx context.Context, app string) (map[string]map[string]string, error)
	// SetMetadata sets key; an empty value deletes it.
	SetMetadata(ctx context.Context, id, key, value string) error
	// UpdateMetadata sets several keys at once (an empty value deletes its key), in one
	// transaction; with version > 0 only while the machine is at that version, else
	// ErrConflict and nothing changes.
	UpdateMetadata(ctx context.Context, id string, version int, kv map[string]string) error

	CreateVolume(ctx context.Context, v Volume) error
	// GetVolume finds an app's volume by ID or name.
	GetVolume(ctx context.Context, app, idOrName string) (Volume, error)
	ListVolumes(ctx context.Context, app string) ([]Volume, error)
	// AttachVolume records that machineID holds the volume; a volume held by another
	// machine is ErrConflict naming it, and so is a machine that does not exist or is
	// destroyed. An empty machineID detaches.
	AttachVolume(ctx context.Context, id, machineID string) error
	// DetachVolumes lets go of every volume machineID holds, whatever its config says.
	DetachVolumes(ctx context.Context, machineID string) error
	SetVolumeSize(ctx context.Context, id string, size int64) error
	// SetVolumeSnapshots sets how long a volume keeps its snapshots and whether it gets
	// one a day.
	SetVolumeSnapshots(ctx context.Context, id string, retentionDays int, autoBackup bool) error
	// AllVolumes lists every volume of every app, oldest first.
	AllVolumes(ctx context.Context) ([]Volume, error)
	DeleteVolume(ctx context.Context, id string) error
	AddSnapshot(ctx context.Context, sn Snapshot) error
	// Snapshots lists a volume's snapshots, oldest first.
	Snapshots(ctx context.Context, volumeID string) ([]Snapshot, error)
	// AllSnapshots lists the snapshots of every volume, oldest first.
	AllSnapshots(ctx context.Context) ([]Snapshot, error)
	// Snapshot finds a snapshot of any of app's volumes.
	Snapshot(ctx context.Context, app, id string) (Snapshot, error)
	// DeleteSnapshot removes a snapshot's record; one already gone is not an error.
	DeleteSnapshot(ctx context.Context, id string) error
	Close() error
}

// Build is a build's record. Spec is what was asked for and Result what happened, both
// owned by the build service; State changes only through Builds.UpdateBuild's compare
// and swap, on the build's Rev.
type Build struct {
	ID        string          `json:"id"`
	Project   string          `json:"project"`
	Branch    string          `json:"branch,omitempty"`
	State     string          `json:"state"`
	Attempt   int             `json:"attempt"`
	Spec      json.RawMessage `json:"spec"`
	Result    json.RawMessage `json:"result"`
	NotBefore time.Time       `json:"not_before"`
	CreatedAt time.Time       `json:"created_at"`
	UpdatedAt time.Time       `json:"updated_at"`
	// Host runs (or last ran) the build; "" on a database only one host uses.
	Host string `json:"host,omitempty"`
}

// BuildRev names one attempt of a build at one state: what a change to the build
// compares. The state alone is not enough: a host cut off from the others still holds
// its attempt as running while another host has taken the build over as a new running
// attempt, and the late result of the old one must not land on the new one.
type BuildRev struct {
	State   string
	Attempt int
	Host    string
}

// Rev is the revision b was read at.
func (b Build) Rev() BuildRev { return BuildRev{State: b.State, Attempt: b.Attempt, Host: b.Host} }

// Builds persists builds and their queue.
type Builds interface {
	CreateBuild(ctx context.Context, b Build) error
	// GetBuild returns a build; an unknown ID is ErrNotFound.
	GetBuild(ctx context.Context, id string) (Build, error)
	// ListBuilds lists a project's builds, newest first.
	ListBuilds(ctx context.Context, project string) ([]Build, error)
	// BuildsInState lists builds in any of the states, oldest first: the queue.
	BuildsInState(ctx context.Context, states ...string) ([]Build, error)
	// UpdateBuild writes b if the stored build is still at from (its state, attempt and
	// host); otherwise it is ErrConflict and nothing changes.
	UpdateBuild(ctx context.Context, b Build, from BuildRev) error
	// Build contexts are kept in the store when hosts share it, so that any host can
	// run (or retry) a build.
	PutBuildContext(ctx context.Context, id string, data []byte) error
	BuildContext(ctx context.Context, id string) ([]byte, error)
	DeleteBuildContext(ctx context.Context, id string) error
}

// Host is a host sharing the database: what it offers and when it last said it was alive.
type Host struct {
	Name             string    `json:"name"`
	APIURL           string    `json:"api_url"`
	CPUs             int       `json:"cpus"`
	MemoryMiB        int       `json:"memory_mib"`
	CPURatio         float64   `json:"cpu_ratio"`
	MemRatio         float64   `json:"memory_ratio"`
	ReserveCPUs      int       `json:"reserve_cpus"`
	ReserveMemoryMiB int       `json:"reserve_memory_mib"`
	Cordoned         bool      `json:"cordoned"`
	HeartbeatAt      time.Time `json:"heartbeat_at"`
	// PeerURL is the host's peer listener (https, mutual TLS with the cluster's CA):
	// other hosts forward calls and pull images there.
	PeerURL string `json:"peer_url,omitempty"`
}

// Hosts persists the hosts of a cluster and its shared settings.
type Hosts interface {
	RegisterHost(ctx context.Context, h Host) error
	Heartbeat(ctx context.Context, name string, at time.Time) error
	ListHosts(ctx context.Context) ([]Host, error)
	SetHostCordoned(ctx context.Context, name string, cordoned bool) error
	Setting(ctx context.Context, key, def string) (string, error)
	// MoveMachine gives a stopped machine to another host.
	MoveMachine(ctx context.Context, id, host string) error
	// HostUsage is what the machines holding room (HoldsRoom) ask for, per host. The
	// store keeps it in the transactions that change a machine's state, host or config,
	// so reading it costs one row per host, not a pass over every machine.
	HostUsage(ctx context.Context) (map[string]Usage, error)
	// MachinesOnHost lists the machines placed on a host ("" on a database one host
	// uses), oldest first, of every app.
	MachinesOnHost(ctx context.Context, host string) ([]Machine, error)
}

// DefaultSnapshotRetention is Fly's: a new volume keeps its snapshots five days unless
// told otherwise.
const DefaultSnapshotRetention = 5

// Usage is what machines ask for: their guests' vCPUs and memory, in the capacity
// ledger's terms, so that placement reads the store's usage without a copy.
type Usage = capacity.Size

// HoldsRoom says whether a machine in state s holds room on its host: from the start of a
// boot until its VM is gone or saved.
func HoldsRoom(s machine.State) bool {
	switch s {
	case machine.Starting, machine.Started, machine.Stopping, machine.Suspending:
		return true
	}
	return false
}
