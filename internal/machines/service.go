// Package machines is the user-facing machine service of a host: create, start, stop,
// suspend, update, destroy, wait, signal and exec, plus volumes. It checks requests
// (the config rules are package machine's), records machines, and hands every state
// change to the supervisor, which decides it with machine.Decide and runs the VMs. The
// adapter from the supervisor's runtime port to vmrun lives here too (runtime.go).
package machines

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/serverlog"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/supervisor"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// Images resolves image references to images.
type Images interface {
	Resolve(ctx context.Context, ref string) (v1.Image, error)
}

// Network gives machines their place on their app's private network. A lease is
// stable from a machine's first start until Detach.
type Network interface {
	Attach(ctx context.Context, app, id string) (network.Lease, error)
	Detach(ctx context.Context, id string) error
	Lookup(id string) (network.Lease, bool)
	// Reconcile drops the leases of machines keep rejects and removes whatever devices
	// and rules no lease accounts for.
	Reconcile(ctx context.Context, keep func(id string) bool) error
}

// Config is what a Service is made of.
type Config struct {
	Store  store.Store
	VMs    *vmrun.Runtime
	Images Images
	Rootfs image.Cache
	// Dir holds each machine's stored output (Dir/ID); volumes live beside it.
	Dir string
	// Log takes the service's lines; a line about an API call carries its request id.
	// Nil logs nothing.
	Log *slog.Logger
	// Net, when set, puts every machine on its app's private network.
	Net Network
	// Capacity, when set, holds room for every running machine; a start that finds
	// none waits up to CapacityWait in its queue, then fails saying what was short.
	Capacity     *capacity.Ledger
	CapacityWait time.Duration
	// Host names this host in a database several hosts share: it runs and recovers only
	// the machines placed on it.
	Host string
	// Place, if set, picks the host for a new machine (without volumes, which stay with
	// their host); nil keeps every machine on this host.
	Place func(ctx context.Context, size capacity.Size) (string, error)
	// Internal are the kinds of machine kiln runs for itself, by app
	// (machine.InternalApp names).
	Internal map[string]Internal
}

// Service runs this host's machines. Call Recover before serving requests.
type Service struct {
	cfg Config
	rt  *vmRuntime
	sup *supervisor.Supervisor
	// guest holds running machines' last stats from their agents, for /metrics.
	guest guestStats
}

// New returns the service; Close lets go of its VMs without stopping them.
func New(cfg Config) *Service {
	s := &Service{cfg: cfg}
	s.rt = &vmRuntime{vms: cfg.VMs, store: cfg.Store, images: cfg.Images, cache: cfg.Rootfs, net: cfg.Net, log: serverlog.Writer(cfg.Log),
		internal: cfg.Internal, saved: map[string]*vmInstance{}}
	scfg := supervisor.Config{Store: cfg.Store, Runtime: s.rt, CapacityWait: cfg.CapacityWait, LogDir: cfg.Dir,
		Remove: s.remove, Log: cfg.Log}
	if cfg.Capacity != nil {
		scfg.Capacity = cfg.Capacity
	}
	s.sup = supervisor.New(scfg)
	return s
}

// UseSecrets gives booting machines their app's secrets: f returns them at a version
// (0: the latest). A machine gets them as environment variables when it boots, and
// nowhere else: they are in neither its config nor its record.
func (s *Service) UseSecrets(f func(ctx context.Context, app string, version int) (map[string]string, error)) {
	s.rt.secrets = f
}

// log is the service's logger for what ctx is doing: an API call's lines carry its id.
func (s *Service) log(ctx context.Context) *slog.Logger { return serverlog.For(ctx, s.cfg.Log) }

func (s *Service) logf(ctx context.Context, format string, args ...any) {
	s.log(ctx).Info(fmt.Sprintf(format, args...))
}

func newID() string {
	var b [7]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func sizeOf(cfg api.MachineConfig) capacity.Size {
	return capacity.Size{CPUs: cfg.Guest.CPUs, MemoryMiB: cfg.Guest.MemoryMB}
}

// Create records a machine and starts it (unless req.SkipLaunch). Everything that can
// be checked is checked first, so a refused request leaves no record and no VM. With
// req.LeaseTTL the machine is leased before it starts, and the lease's nonce returned.
func (s *Service) Create(ctx context.Context, app string, req api.CreateMachineRequest) (store.Machine, string, error) {
	if machine.InternalApp(app) {
		return store.Machine{}, "", errdefs.New(errdefs.ErrNotFound, "app %s not found", app)
	}
	cfg := req.Config
	if err := machine.Validate(&cfg); err != nil {
		return store.Machine{}, "", err
	}
	if req.LeaseTTL != 0 {
		if err := checkLeaseTTL(time.Duration(req.LeaseTTL) * time.Second); err != nil {
			return store.Machine{}, "", errdefs.Wrap(errdefs.ErrInvalid, err, "lease_ttl")
		}
	}
	if err := s.checkPorts(ctx, app, "", cfg); err != nil {
		return store.Machine{}, "", err
	}
	if s.cfg.Capacity != nil {
		if err := s.cfg.Capacity.CanEverFit(sizeOf(cfg)); err != nil {
			return store.Machine{}, "", err
		}
	}
	if _, err := s.rt.rootfs(ctx, cfg.Image); err != nil {
		return store.Machine{}, "", err
	}
	id := newID()
	name := req.Name
	if name == "" {
		name = id
	}
	if err := machine.CheckName(name); err != nil {
		return store.Machine{}, "", err
	}
	// Volumes are claimed in the transaction that makes the record: a crash leaves both
	// or neither, never a volume held by a machine that does not exist.
	var volumes []string
	for _, mt := range cfg.Mounts {
		v, err := s.cfg.Store.GetVolume(ctx, app, mt.Volume)
		if err != nil {
			return store.Machine{}, "", err
		}
		volumes = append(volumes, v.ID)
	}
	raw := storedConfig(cfg)
	host := s.cfg.Host
	if s.cfg.Place != nil && len(cfg.Mounts) == 0 {
		// Where nothing fits now, the machine stays here and waits in this host's queue.
		if h, err := s.cfg.Place(ctx, sizeOf(cfg)); err == nil {
			host = h
		}
	}
	if req.NoCapacityWait && !req.SkipLaunch && host == s.cfg.Host && s.cfg.Capacity != nil {
		// Hold the room now; the start takes over the hold.
		if _, err := s.cfg.Capacity.Reserve(ctx, id, capacity.Request{Size: sizeOf(cfg)}, 0, nil); err != nil {
			return store.Machine{}, "", err
		}
	}
	rec := store.Machine{ID: id, App: app, Name: name, State: machine.Created, Config: raw, Host: host}
	ev := machine.Event{Type: string(machine.EvLaunch), Status: machine.Created, Source: machine.SourceUser}
	if err := s.cfg.Store.CreateMachine(ctx, rec, ev, volumes...); err != nil {
		if s.cfg.Capacity != nil {
			s.cfg.Capacity.Release(id)
		}
		return rec, "", err
	}
	// The config's metadata is the machine's metadata: the metadata calls read and
	// change the same keys.
	if len(cfg.Metadata) > 0 {
		if err := s.cfg.Store.UpdateMetadata(ctx, id, 0, cfg.Metadata); err != nil {
			return rec, "", s.undoCreate(ctx, id, err)
		}
	}
	if req.SkipServiceRegistration {
		if err := s.cfg.Store.SetCordoned(ctx, id, true); err != nil {
			return rec, "", s.undoCreate(ctx, id, err)
		}
	}
	var nonce string
	if req.LeaseTTL != 0 {
		l, err := s.TakeLease(ctx, id, "", time.Duration(req.LeaseTTL)*time.Second, "taken at launch")
		if err != nil {
			return rec, "", s.undoCreate(ctx, id, err)
		}
		nonce = l.Nonce
	}
	if !req.SkipLaunch {
		if err := s.Start(ctx, id); err != nil {
			if nonce != "" {
				// The caller never learns the nonce of a create that failed: let go of it,
				// or nobody could change the machine until the lease ran out.
				s.ReleaseLease(context.WithoutCancel(ctx), id, nonce)
			}
			return rec, "", err
		}
	}
	rec, err := s.cfg.Store.GetMachine(ctx, id)
	return rec, nonce, err
}

// storedConfig is a config as the machine's record keeps it: without its metadata, which
// the metadata table holds alone (reads show the table's as the config's).
func storedConfig(cfg api.MachineConfig) []byte {
	cfg.Metadata = nil
	raw, _ := json.Marshal(cfg)
	return raw
}

// undoCreate destroys a machine whose creation failed after its record was made, so a
// refused request leaves nothing, and returns the failure.
func (s *Service) undoCreate(ctx context.Context, id string, cause error) error {
	if err := s.Destroy(context.WithoutCancel(ctx), id, true); err != nil {
		s.logf(ctx, "machine %s: removing it after a failed create: %v", id, err)
	}
	if s.cfg.Capacity != nil {
		s.cfg.Capacity.Release(id) // a no_capacity_wait hold
	}
	return cause
}

// Start starts a created, stopped, failed or suspended machine. One placed on another
// host is recorded as starting; that host claims it.
func (s *Service) Start(ctx context.Context, id string) error {
	rec, err := s.cfg.Store.GetMachine(ctx, id)
	if err != nil {
		return err
	}
	if !s.Mine(rec) {
		return s.sup.Record(ctx, id, machine.InStart)
	}
	_, err = s.sup.Apply(ctx, id, machine.InStart, supervisor.Request{})
	return err
}

// Stop stops a machine's workload and VM.
func (s *Service) Stop(ctx context.Context, id string) error { return s.StopWith(ctx, id, 0, 0) }

// StopWith stops a machine, first sending sig to its workload and giving it timeout to
// exit (zero values: the config's stop_config, else power off at once).
func (s *Service) StopWith(ctx context.Context, id string, sig int, timeout time.Duration) error {
	if timeout > machine.MaxStopGrace || timeout < 0 {
		return errdefs.Invalid("timeout %s: want a duration up to %s", timeout, machine.MaxStopGrace)
	}
	_, err := s.sup.Apply(ctx, id, machine.InStop, supervisor.Request{Signal: sig, Timeout: timeout})
	return err
}

// Suspend saves a started machine's VM to disk and ends its VMM; Start resumes it where
// it was.
func (s *Service) Suspend(ctx context.Context, id string) error {
	if !s.cfg.VMs.Driver.Capabilities().Snapshot {
		return errdefs.New(errdefs.ErrNotImplemented, "the %s driver cannot suspend machines: stop it instead", s.cfg.VMs.Driver.Name())
	}
	_, err := s.sup.Apply(ctx, id, machine.InSuspend, supervisor.Request{})
	return err
}

// Destroy removes a machine. A running one needs force, as with Fly: it is stopped
// first.
func (s *Service) Destroy(ctx context.Context, id string, force bool) error {
	rec, err := s.cfg.Store.GetMachine(ctx, id)
	if err != nil {
		return err
	}
	switch rec.State {
	case machine.Destroyed:
		return errdefs.New(errdefs.ErrNotFound, "machine %s is already destroyed", id)
	case machine.Started, machine.Starting:
		if !force {
			return errdefs.New(errdefs.ErrConflict, "machine %s is %s: stop it first, or destroy with force=true", id, rec.State)
		}
		if err := s.Stop(ctx, id); err != nil && !errors.Is(err, errdefs.ErrConflict) {
			return err
		}
	}
	// Between an exit and a policy restart the machine is stopped but supervised: keep
	// it from restarting, then wait for its supervisor to end.
	if done := s.sup.Done(id); done != nil {
		s.sup.Hold(id)
		select {
		case <-done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	_, err = s.sup.Apply(ctx, id, machine.InDestroy, supervisor.Request{})
	if err != nil && errors.Is(err, errdefs.ErrNotFound) {
		return errdefs.New(errdefs.ErrNotFound, "machine %s is already destroyed", id)
	}
	return err
}

// remove lets go of what a destroyed machine holds besides its VM. Every step is safe to
// redo: recovery repeats it for a destroy that a crash cut short.
func (s *Service) remove(ctx context.Context, id string) error {
	// Volumes outlive their machine: all it holds are let go, whatever its config names.
	if err := s.cfg.Store.DetachVolumes(ctx, id); err != nil {
		return fmt.Errorf("destroying machine %s: detaching its volumes: %w", id, err)
	}
	os.RemoveAll(s.LogDir(id))
	if s.cfg.Net != nil {
		if err := s.cfg.Net.Detach(ctx, id); err != nil {
			s.logf(ctx, "machine %s: removing its network device: %v (kiln removes it at its next restart)", id, err)
		}
	}
	return nil
}

// Wait waits until the machine is in state, or the timeout passes (ErrTimeout).
func (s *Service) Wait(ctx context.Context, id string, state machine.State, timeout time.Duration) error {
	_, err := s.WaitFor(ctx, id, []machine.State{state}, 0, timeout)
	return err
}

// WaitFor waits until the machine is in one of states and returns it, or the timeout
// passes (ErrTimeout). A version > 0 names the config the caller means: one the
// machine has moved past counts as stopped (and destroyed), since that instance
// ended; waiting for it to start is ErrConflict. It listens for the state changes this
// host records; a change another host records is seen within a second.
func (s *Service) WaitFor(ctx context.Context, id string, states []machine.State, version int, timeout time.Duration) (store.Machine, error) {
	for _, st := range states {
		if !st.Valid() {
			return store.Machine{}, errdefs.Invalid("state %q is not a machine state", st)
		}
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		changed := s.sup.Changed()
		rec, err := s.cfg.Store.GetMachine(ctx, id)
		if err != nil {
			return rec, err
		}
		switch {
		case version > rec.Version:
			return rec, errdefs.New(errdefs.ErrNotFound, "machine %s has no version %d yet (it is at %d)", id, version, rec.Version)
		case version > 0 && version < rec.Version:
			for _, st := range states {
				if st == machine.Stopped || st == machine.Destroyed {
					return rec, nil
				}
			}
			return rec, errdefs.New(errdefs.ErrConflict, "machine %s version %d was replaced by version %d: wait on that", id, version, rec.Version)
		case slices.Contains(states, rec.State):
			return rec, nil
		}
		select {
		case <-ctx.Done():
			return rec, ctx.Err()
		case <-deadline.C:
			return rec, errdefs.New(errdefs.ErrTimeout, "machine %s is %s, not %s, after %s", id, rec.State, joinStates(states), timeout)
		case <-changed:
		case <-time.After(time.Second):
		}
	}
}

func joinStates(states []machine.State) string {
	words := make([]string, len(states))
	for i, st := range states {
		words[i] = string(st)
	}
	return strings.Join(words, " or ")
}

// Signal delivers a signal to a started machine's workload.
func (s *Service) Signal(ctx context.Context, id string, sig int) error {
	vm := s.sup.Running(id)
	if vm == nil {
		return errdefs.New(errdefs.ErrConflict, "machine %s is not running: nothing to signal", id)
	}
	s.log(ctx).Info("signal", "machine", id, "signal", sig)
	return vm.Signal(ctx, sig)
}

// Update replaces a machine's config with a new version. A running machine is stopped
// first; the machine is then started on the new config, unless req.SkipLaunch. The config's
// metadata replaces the machine's. req.CurrentVersion, if given, must be the machine's
// version.
func (s *Service) Update(ctx context.Context, id string, req api.CreateMachineRequest) (store.Machine, error) {
	cfg := req.Config
	if err := machine.Validate(&cfg); err != nil {
		return store.Machine{}, err
	}
	if _, err := s.rt.rootfs(ctx, cfg.Image); err != nil {
		return store.Machine{}, err
	}
	rec, err := s.cfg.Store.GetMachine(ctx, id)
	if err != nil {
		return rec, err
	}
	if req.CurrentVersion != "" && req.CurrentVersion != strconv.Itoa(rec.Version) {
		return rec, errdefs.New(errdefs.ErrConflict, "machine %s is at version %d, not %s: read it again and retry", id, rec.Version, req.CurrentVersion)
	}
	if err := s.checkPorts(ctx, rec.App, id, cfg); err != nil {
		return rec, err
	}
	if !reflect.DeepEqual(cfg.Mounts, machine.DecodeConfig(rec.Config).Mounts) {
		return rec, errdefs.Invalid("config.mounts cannot change on update yet: create a new machine for other volumes")
	}
	wasRunning := rec.State == machine.Started || rec.State == machine.Starting
	if wasRunning {
		if err := s.stopAndWait(ctx, id, 0, 0); err != nil {
			return rec, err
		}
	}
	raw := storedConfig(cfg)
	// From the version read above: an update that raced this one is not overwritten.
	if err := s.cfg.Store.UpdateConfig(ctx, id, rec.Version, raw); err != nil {
		if wasRunning {
			// Refused: the machine runs again as it was (unless the update that won
			// started it already).
			if serr := s.Start(ctx, id); serr != nil && !errors.Is(serr, errdefs.ErrConflict) {
				s.logf(ctx, "machine %s: starting it again after a refused update: %v", id, serr)
			}
		}
		return rec, err
	}
	if err := s.replaceMetadata(ctx, id, cfg.Metadata); err != nil {
		return rec, err
	}
	// As on Fly, an update starts the machine on its new config, whatever state it was
	// in, unless skip_launch says not to.
	if !req.SkipLaunch {
		if err := s.Start(ctx, id); err != nil {
			return rec, err
		}
	}
	return s.cfg.Store.GetMachine(ctx, id)
}

// replaceMetadata makes md the machine's metadata.
func (s *Service) replaceMetadata(ctx context.Context, id string, md map[string]string) error {
	old, err := s.cfg.Store.Metadata(ctx, id)
	if err != nil {
		return err
	}
	kv := maps.Clone(md)
	if kv == nil {
		kv = map[string]string{}
	}
	for k := range old {
		if _, keep := md[k]; !keep {
			kv[k] = ""
		}
	}
	return s.cfg.Store.UpdateMetadata(ctx, id, 0, kv)
}

// stopAndWait stops a machine (see StopWith) and waits until it is stopped and its
// supervisor has ended: what a restart, an update and a drain do first.
func (s *Service) stopAndWait(ctx context.Context, id string, sig int, timeout time.Duration) error {
	if err := s.StopWith(ctx, id, sig, timeout); err != nil && !errors.Is(err, errdefs.ErrConflict) {
		return err
	}
	if err := s.Wait(ctx, id, machine.Stopped, 2*time.Minute); err != nil {
		return err
	}
	if done := s.sup.Done(id); done != nil {
		select {
		case <-done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Restart stops a running machine (see StopWith) and starts it again.
func (s *Service) Restart(ctx context.Context, id string, sig int, timeout time.Duration) error {
	rec, err := s.cfg.Store.GetMachine(ctx, id)
	if err != nil {
		return err
	}
	if rec.State == machine.Started || rec.State == machine.Starting {
		if err := s.stopAndWait(ctx, id, sig, timeout); err != nil {
			return err
		}
	}
	return s.Start(ctx, id)
}

// Mine says whether this host runs the machine.
func (s *Service) Mine(rec store.Machine) bool { return rec.RunsOn(s.cfg.Host) }

// PrivateIP is the machine's address on its app's network, if it has one.
func (s *Service) PrivateIP(id string) string {
	if s.cfg.Net == nil {
		return ""
	}
	if l, ok := s.cfg.Net.Lookup(id); ok {
		return l.Addr.Addr().String()
	}
	return ""
}

// LogDir is where a machine's output is stored.
func (s *Service) LogDir(id string) string { return s.sup.LogDir(id) }

// Claim starts supervising a machine another host placed here; false if one runs it.
func (s *Service) Claim(id string) bool { return s.sup.Claim(id) }

// Close stops supervising and lets go of every VM without stopping it: the next kiln
// adopts them.
func (s *Service) Close() { s.sup.Close() }

// EnsureInternal records machine id of an internal kind (app) with cfg if it does not
// exist yet; it is not started. An existing one gets cfg when it differs and the
// machine is not running (a builder's size set by the server's flags, say).
func (s *Service) EnsureInternal(ctx context.Context, app, id, name string, cfg api.MachineConfig) (store.Machine, error) {
	if s.rt.internal[app] == nil {
		return store.Machine{}, errdefs.Invalid("no internal machine kind %q", app)
	}
	raw, _ := json.Marshal(cfg)
	rec, err := s.cfg.Store.GetMachine(ctx, id)
	switch {
	case err == nil && !s.Mine(rec):
		return rec, errdefs.New(errdefs.ErrConflict, "machine %s belongs to host %s, not this one", id, rec.Host)
	case err == nil && rec.State == machine.Destroyed:
		return rec, errdefs.New(errdefs.ErrConflict, "machine %s is destroyed: its ID cannot be used again", id)
	case err == nil:
		if string(rec.Config) != string(raw) && (rec.State == machine.Stopped || rec.State == machine.Created || rec.State == machine.Failed) {
			if err := s.cfg.Store.UpdateConfig(ctx, id, rec.Version, raw); err != nil && !errors.Is(err, errdefs.ErrConflict) {
				return rec, err
			}
			return s.cfg.Store.GetMachine(ctx, id)
		}
		return rec, nil
	case !errors.Is(err, errdefs.ErrNotFound):
		return rec, err
	}
	if err := s.cfg.Store.CreateApp(ctx, app); err != nil && !errors.Is(err, errdefs.ErrConflict) {
		return store.Machine{}, err
	}
	rec = store.Machine{ID: id, App: app, Name: name, State: machine.Created, Config: raw, Host: s.cfg.Host}
	ev := machine.Event{Type: string(machine.EvLaunch), Status: machine.Created, Source: machine.SourceKiln}
	if err := s.cfg.Store.CreateMachine(ctx, rec, ev); err != nil && !errors.Is(err, errdefs.ErrConflict) {
		return rec, err
	}
	return s.cfg.Store.GetMachine(ctx, id)
}

// Internal lists this host's machines of an internal app.
func (s *Service) Internal(ctx context.Context, app string) ([]store.Machine, error) {
	if !machine.InternalApp(app) {
		return nil, errdefs.Invalid("%s is not an internal app", app)
	}
	ms, err := s.cfg.Store.ListMachines(ctx, app)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil, nil // none made yet
	}
	var out []store.Machine
	for _, rec := range ms {
		if s.Mine(rec) && rec.State != machine.Destroyed {
			out = append(out, rec)
		}
	}
	return out, err
}

// Instance is the running VM of machine id, for kiln's own use of an internal
// machine (exec and connect through its agent); nil if it does not run.
func (s *Service) Instance(id string) *vmrun.Instance {
	if v, ok := s.sup.Running(id).(*vmInstance); ok {
		return v.inst
	}
	return nil
}

// Get returns a machine's record.
func (s *Service) Get(ctx context.Context, id string) (store.Machine, error) {
	return s.cfg.Store.GetMachine(ctx, id)
}

// Changed returns a channel closed at the next state change this host records.
func (s *Service) Changed() <-chan struct{} { return s.sup.Changed() }

// CanSuspend says whether this host's VMM can save machines to disk.
func (s *Service) CanSuspend() bool { return s.cfg.VMs.Driver.Capabilities().Snapshot }

// Events returns a machine's journal, oldest first.
func (s *Service) Events(ctx context.Context, id string) ([]machine.Event, error) {
	return s.cfg.Store.Events(ctx, id)
}

// DeleteApp deletes an app. With force its machines are destroyed and its volumes
// deleted first; without, an app that still has any is ErrConflict.
func (s *Service) DeleteApp(ctx context.Context, app string, force bool) error {
	if machine.InternalApp(app) {
		return errdefs.New(errdefs.ErrNotFound, "app %s not found", app)
	}
	if force {
		ms, err := s.cfg.Store.ListMachines(ctx, app)
		if err != nil {
			return err
		}
		// All or nothing where it can be known first: a leased machine, or one on
		// another host, stops the delete before anything is destroyed.
		for _, m := range ms {
			if m.State == machine.Destroyed {
				continue
			}
			if err := s.CheckLease(ctx, m.ID, ""); err != nil {
				return fmt.Errorf("deleting app %s: %w", app, err)
			}
			if !s.Mine(m) {
				return errdefs.New(errdefs.ErrConflict, "machine %s of app %s runs on host %s: destroy it there, then delete the app", m.ID, app, m.Host)
			}
		}
		for _, m := range ms {
			if m.State == machine.Destroyed {
				continue
			}
			if err := s.Destroy(ctx, m.ID, true); err != nil {
				return fmt.Errorf("deleting app %s: %w", app, err)
			}
		}
		vs, err := s.cfg.Store.ListVolumes(ctx, app)
		if err != nil {
			return err
		}
		for _, v := range vs {
			if _, err := s.DeleteVolume(ctx, app, v.ID); err != nil {
				return fmt.Errorf("deleting app %s: %w", app, err)
			}
		}
	}
	if err := s.cfg.Store.DeleteApp(ctx, app); err != nil {
		return err
	}
	metrics.ForgetApp(app)
	return nil
}
