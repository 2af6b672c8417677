// Package node runs machines on this host: it boots each machine's VM from its image,
// runs the workload under the guest's supervision, stores its output, records every
// state change through the store, applies the restart policy, and after a kiln restart
// adopts the VMs that kept running (or cleans up those no machine owns).
package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machinelog"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/vmm"
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

// Manager runs this host's machines. Create one with New and call Recover before
// serving requests.
type Manager struct {
	Store  store.Store
	RT     *vmrun.Runtime
	Images Images
	Rootfs image.Cache
	// Dir holds each machine's stored output (Dir/ID).
	Dir string
	Log io.Writer
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

	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	runs   map[string]*run
	// saved holds the VMs of suspended machines, ready to resume.
	saved map[string]*vmrun.Instance
	wg    sync.WaitGroup
}

// run is one machine's supervisor.
type run struct {
	mu   sync.Mutex
	inst *vmrun.Instance
	// as is how execs run: the workload's user, environment and working directory, as
	// `docker exec` does.
	as       guest.ExecRequest
	stopping bool
	// stopSignal, if set, is sent to the workload first; the VM is powered off when the
	// workload has exited or stopTimeout has passed.
	stopSignal  int
	stopTimeout time.Duration
	suspending  bool
	cancel      context.CancelFunc // ends the wait on the workload
	done        chan struct{}
}

// New returns a manager; Close lets go of its VMs without stopping them.
func New(st store.Store, rt *vmrun.Runtime, images Images, rootfs image.Cache, dir string, log io.Writer) *Manager {
	ctx, cancel := context.WithCancel(context.Background())
	return &Manager{Store: st, RT: rt, Images: images, Rootfs: rootfs, Dir: dir, Log: log, ctx: ctx, cancel: cancel, runs: map[string]*run{}, saved: map[string]*vmrun.Instance{}}
}

func (m *Manager) logf(format string, args ...any) {
	if m.Log != nil {
		fmt.Fprintf(m.Log, "kiln: "+format+"\n", args...)
	}
}

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

func newMachineID() string {
	var b [7]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// validate checks a config and fills defaults. Every error names the field.
func validate(cfg *api.MachineConfig) error {
	if cfg.Image == "" {
		return errdefs.Invalid("config.image is required: the image to run, e.g. localhost/app:1")
	}
	if _, err := image.NormalizeRef(cfg.Image); err != nil && !strings.HasPrefix(cfg.Image, "sha256:") {
		return errdefs.Invalid("config.image: %v", err)
	}
	if cfg.Guest.CPUs == 0 {
		cfg.Guest.CPUs = 1
	}
	if cfg.Guest.MemoryMB == 0 {
		cfg.Guest.MemoryMB = 256
	}
	if n := runtime.NumCPU(); cfg.Guest.CPUs < 1 || cfg.Guest.CPUs > n {
		return errdefs.Invalid("config.guest.cpus=%d is out of range: this host allows 1 to %d", cfg.Guest.CPUs, n)
	}
	if max := vmm.HostMemoryMiB() - 256; cfg.Guest.MemoryMB < vmm.MinMemoryMiB || cfg.Guest.MemoryMB > max {
		return errdefs.Invalid("config.guest.memory_mb=%d is out of range: this host allows %d to %d", cfg.Guest.MemoryMB, vmm.MinMemoryMiB, max)
	}
	if err := (machine.RestartPolicy{Policy: cfg.Restart.Policy, MaxRetries: cfg.Restart.MaxRetries}).Validate(); err != nil {
		return errdefs.Invalid("config.%v", err)
	}
	seen := map[string]bool{}
	for i, mt := range cfg.Mounts {
		if mt.Volume == "" {
			return errdefs.Invalid("config.mounts[%d].volume is required: a volume name or ID", i)
		}
		if !strings.HasPrefix(mt.Path, "/") || mt.Path == "/" || strings.ContainsAny(mt.Path, " :") {
			return errdefs.Invalid("config.mounts[%d].path %q must be an absolute path other than /, like /data", i, mt.Path)
		}
		if seen[mt.Volume] {
			return errdefs.Invalid("config.mounts: volume %s is mounted twice", mt.Volume)
		}
		seen[mt.Volume] = true
	}
	if cfg.StopConfig != nil && cfg.StopConfig.Timeout != "" {
		if _, err := time.ParseDuration(cfg.StopConfig.Timeout); err != nil {
			return errdefs.Invalid("config.stop_config.timeout %q: want a duration like 10s", cfg.StopConfig.Timeout)
		}
	}
	if cfg.StopConfig != nil && cfg.StopConfig.Signal != "" {
		if _, err := SignalNumber(cfg.StopConfig.Signal); err != nil {
			return errdefs.Invalid("config.stop_config.%v", err)
		}
	}
	for k := range cfg.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return errdefs.Invalid("config.env key %q is not a valid variable name", k)
		}
	}
	for i := range cfg.Services {
		if err := validateService(&cfg.Services[i]); err != nil {
			return errdefs.Invalid("config.services[%d].%v", i, err)
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

// checkPorts refuses public ports that another app serves differently: a raw TCP port
// belongs to one app, an HTTP port is shared by Host name. self is the machine being
// updated, if any.
func (m *Manager) checkPorts(ctx context.Context, app, self string, cfg api.MachineConfig) error {
	if len(cfg.Services) == 0 {
		return nil
	}
	if m.Net == nil {
		return errdefs.Invalid("config.services: this server runs without machine networking (--network=false), so nothing can reach a service; remove the services or turn networking on")
	}
	type use struct {
		app, machine string
		http         bool
	}
	taken := map[int]use{}
	apps, err := m.Store.ListApps(ctx)
	if err != nil {
		return err
	}
	for _, other := range apps {
		ms, err := m.Store.ListMachines(ctx, other)
		if err != nil {
			return err
		}
		for _, rec := range ms {
			if rec.ID == self || rec.State == machine.Destroyed || rec.State == machine.Destroying {
				continue
			}
			for _, svc := range config(rec).Services {
				for _, p := range svc.Ports {
					taken[p.Port] = use{other, rec.ID, len(p.Handlers) > 0}
				}
			}
		}
	}
	for _, svc := range cfg.Services {
		for _, p := range svc.Ports {
			u, ok := taken[p.Port]
			http := len(p.Handlers) > 0
			switch {
			case !ok:
			case u.app != app && !(http && u.http):
				return errdefs.New(errdefs.ErrConflict, "port %d is already used by app %s: a raw TCP port belongs to one app; choose another port", p.Port, u.app)
			case http != u.http:
				return errdefs.New(errdefs.ErrConflict, "port %d is served as %s by machine %s: services on one port must agree on handlers", p.Port, map[bool]string{true: "HTTP", false: "raw TCP"}[u.http], u.machine)
			}
		}
	}
	return nil
}

// Create records a machine and starts it. Everything that can be checked is checked
// first, so a refused request leaves no record and no VM.
func (m *Manager) Create(ctx context.Context, app string, req api.CreateMachineRequest) (store.Machine, error) {
	cfg := req.Config
	if err := validate(&cfg); err != nil {
		return store.Machine{}, err
	}
	if err := m.checkPorts(ctx, app, "", cfg); err != nil {
		return store.Machine{}, err
	}
	if m.Capacity != nil {
		if err := m.Capacity.CanEverFit(capacity.Size{CPUs: cfg.Guest.CPUs, MemoryMiB: cfg.Guest.MemoryMB}); err != nil {
			return store.Machine{}, err
		}
	}
	if _, err := m.rootfs(ctx, cfg.Image); err != nil {
		return store.Machine{}, err
	}
	id := newMachineID()
	name := req.Name
	if name == "" {
		name = id
	}
	if !nameRE.MatchString(name) {
		return store.Machine{}, errdefs.Invalid("name %q: use lowercase letters, digits and dashes, up to 63", name)
	}
	// Volumes are claimed in the transaction that makes the record: a crash leaves both
	// or neither, never a volume held by a machine that does not exist.
	var volumes []string
	for _, mt := range cfg.Mounts {
		v, err := m.Store.GetVolume(ctx, app, mt.Volume)
		if err != nil {
			return store.Machine{}, err
		}
		volumes = append(volumes, v.ID)
	}
	raw, _ := json.Marshal(cfg)
	host := m.Host
	if m.Place != nil && len(cfg.Mounts) == 0 {
		// Where nothing fits now, the machine stays here and waits in this host's queue.
		if h, err := m.Place(ctx, capacity.Size{CPUs: cfg.Guest.CPUs, MemoryMiB: cfg.Guest.MemoryMB}); err == nil {
			host = h
		}
	}
	if req.NoCapacityWait && host == m.Host && m.Capacity != nil {
		// Hold the room now; the start takes over the hold.
		if _, err := m.Capacity.Reserve(ctx, id, capacity.Request{Size: capacity.Size{CPUs: cfg.Guest.CPUs, MemoryMiB: cfg.Guest.MemoryMB}}, 0, nil); err != nil {
			return store.Machine{}, err
		}
	}
	rec := store.Machine{ID: id, App: app, Name: name, State: machine.Created, Config: raw, Host: host}
	if err := m.Store.CreateMachine(ctx, rec, machine.Event{Type: "launch", Status: machine.Created, Source: "user"}, volumes...); err != nil {
		if m.Capacity != nil {
			m.Capacity.Release(id)
		}
		return rec, err
	}
	if host != m.Host {
		// Placed on another host: it starts the machine when it claims it.
		if _, err := m.act(ctx, id, machine.ActionStart); err != nil {
			return rec, err
		}
		return m.Store.GetMachine(ctx, id)
	}
	if err := m.Start(ctx, id); err != nil {
		return rec, err
	}
	return m.Store.GetMachine(ctx, id)
}

func (m *Manager) rootfs(ctx context.Context, ref string) (image.Rootfs, error) {
	img, err := m.Images.Resolve(ctx, ref)
	if err != nil {
		return image.Rootfs{}, err
	}
	return m.Rootfs.Rootfs(ctx, img, m.Log)
}

func config(rec store.Machine) api.MachineConfig {
	var c api.MachineConfig
	json.Unmarshal(rec.Config, &c)
	return c
}

// act records the transition a user's action asks for, from whatever state the machine
// is in now.
func (m *Manager) act(ctx context.Context, id string, a machine.Action) (machine.State, error) {
	rec, err := m.Store.GetMachine(ctx, id)
	if err != nil {
		return "", err
	}
	to, err := machine.Next(rec.State, a)
	if err != nil {
		return "", err
	}
	return to, m.Store.Transition(ctx, id, rec.State, to, machine.Event{Type: string(a), Source: "user"})
}

// Start starts a created, stopped or failed machine.
func (m *Manager) Start(ctx context.Context, id string) error {
	if _, err := m.act(ctx, id, machine.ActionStart); err != nil {
		return err
	}
	m.launch(id, nil)
	return nil
}

// execAs is how execs in machine id run: as its workload does.
func (m *Manager) execAs(id string) guest.ExecRequest {
	rec, err := m.Store.GetMachine(m.ctx, id)
	if err != nil {
		return guest.ExecRequest{}
	}
	cfg := config(rec)
	rfs, err := m.rootfs(m.ctx, cfg.Image)
	if err != nil {
		return guest.ExecRequest{}
	}
	return workload(cfg, rfs.Run)
}

func (m *Manager) launch(id string, adopted *vmrun.Instance) {
	r := &run{done: make(chan struct{})}
	if adopted != nil {
		// Ready for execs as soon as Recover returns.
		r.inst, r.as = adopted, m.execAs(id)
	}
	m.mu.Lock()
	m.runs[id] = r
	m.mu.Unlock()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer close(r.done)
		if adopted != nil && m.Capacity != nil {
			// A running VM holds its room whatever the ledger would say now.
			rec, _ := m.Store.GetMachine(m.ctx, id)
			cfg := config(rec)
			m.Capacity.Hold(id, capacity.Size{CPUs: cfg.Guest.CPUs, MemoryMiB: cfg.Guest.MemoryMB})
		}
		m.supervise(id, r, adopted)
		if m.Capacity != nil {
			m.Capacity.Release(id)
		}
		m.mu.Lock()
		if m.runs[id] == r {
			delete(m.runs, id)
		}
		m.mu.Unlock()
		// After the run is gone from the map, a Stop either saw it (and its transition is
		// settled here) or did not (and completed the stop itself).
		m.settle(id)
	}()
}

// workload is what the machine runs: init overrides, else the image's own command.
func workload(cfg api.MachineConfig, run image.Run) guest.ExecRequest {
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

// transition records a change made by kiln itself.
func (m *Manager) transition(id string, from, to machine.State, typ string, code *int) error {
	err := m.Store.Transition(context.WithoutCancel(m.ctx), id, from, to, machine.Event{Type: typ, Source: "kiln", ExitCode: code})
	if err != nil {
		m.logf("machine %s: %s → %s: %v", id, from, to, err)
	}
	return err
}

func (r *run) stopRequested() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stopping
}

// supervise runs one machine until it stops for good: boot, run, wait, record the exit,
// restart by policy. A transition it cannot make means a user changed the machine
// meanwhile (a stop): it re-reads the state and follows the user.
func (m *Manager) supervise(id string, r *run, inst *vmrun.Instance) {
	retries := 0
	release := func() {
		if inst != nil {
			inst.Release()
		}
	}
	for {
		rec, err := m.Store.GetMachine(m.ctx, id)
		if err != nil {
			release()
			return
		}
		cfg := config(rec)
		logs, err := machinelog.Open(filepath.Join(m.Dir, id))
		if err != nil {
			m.logf("machine %s: logs: %v", id, err)
			release()
			return
		}
		offset := logs.Offset()
		if inst == nil {
			// A stop while the machine waits for room ends the wait.
			rctx, rcancel := context.WithCancel(m.ctx)
			r.mu.Lock()
			r.cancel = rcancel
			stopNow := r.stopping
			r.mu.Unlock()
			if stopNow {
				rcancel()
			}
			err := m.reserve(rctx, id, cfg)
			rcancel()
			if err == nil && r.stopRequested() {
				if m.Capacity != nil {
					m.Capacity.Release(id)
				}
				err = context.Canceled
			}
			if err != nil {
				logs.Close()
				if m.ctx.Err() != nil || r.stopRequested() {
					return // settle completes the stop
				}
				m.logf("machine %s cannot start: %v", id, err)
				m.Store.Transition(context.WithoutCancel(m.ctx), id, machine.Starting, machine.Failed,
					machine.Event{Type: "capacity", Source: "kiln", Message: err.Error()})
				return
			}
		}
		if inst == nil {
			// A suspended machine's workload goes on where it was, log offset included.
			if inst = m.resume(id); inst != nil && m.transition(id, machine.Starting, machine.Started, "resume", nil) != nil {
				r.requestStop()
			}
		}
		if inst == nil {
			var berr error
			inst, berr = m.boot(rec, cfg)
			if berr != nil {
				logs.Close()
				if m.ctx.Err() != nil {
					return // kiln is shutting down: Recover starts it again
				}
				m.logf("machine %s failed to start: %v", id, berr)
				m.transition(id, machine.Starting, machine.Failed, "start", nil)
				return // settle completes a stop that came meanwhile
			}
			offset = 0
			logs.Reset()
			if m.transition(id, machine.Starting, machine.Started, "start", nil) != nil {
				r.requestStop() // only a stop moves a starting machine elsewhere
			}
		}
		r.mu.Lock()
		r.inst, r.as = inst, m.execAs(id)
		wctx, cancel := context.WithCancel(m.ctx)
		r.cancel = cancel
		stopNow := r.stopping
		r.mu.Unlock()
		if stopNow {
			cancel()
		}
		last, ferr := m.follow(wctx, id, inst, offset, logs)
		cancel()
		if m.ctx.Err() == nil && r.suspendRequested() {
			logs.Close()
			m.suspend(id, inst, cfg)
			return
		}
		if m.ctx.Err() == nil && r.stopRequested() {
			if l, ok := m.signalAndWait(id, r, inst, cfg, logs); ok {
				last, ferr = l, nil
			}
		}
		logs.Flush()
		logs.Close()
		if m.ctx.Err() != nil {
			// kiln is shutting down: leave the VM running for the next kiln to adopt.
			inst.Release()
			return
		}
		var code *int
		if ferr == nil && last.Exit != nil {
			c := last.Exit.Code
			code = &c
		} else if ferr != nil && !r.stopRequested() {
			m.logf("machine %s: lost its workload: %v", id, ferr)
		}
		if !r.stopRequested() && m.transition(id, machine.Started, machine.Stopping, "exit", code) != nil {
			r.requestStop()
		}
		inst.Shutdown(context.WithoutCancel(m.ctx), stopGrace(cfg))
		inst = nil
		if r.stopRequested() {
			m.finishStop(id, code)
			return
		}
		m.transition(id, machine.Stopping, machine.Stopped, "stop", code)
		exit := -1
		if code != nil {
			exit = *code
		}
		policy := machine.RestartPolicy{Policy: cfg.Restart.Policy, MaxRetries: cfg.Restart.MaxRetries}
		if policy.ShouldRestart(exit, retries) && !r.stopRequested() {
			retries++
			if m.transition(id, machine.Stopped, machine.Starting, "restart", nil) != nil {
				return
			}
			continue
		}
		if cfg.AutoDestroy {
			m.destroyRecord(id, machine.Stopped)
		}
		return
	}
}

// follow stores the workload's output until it exits. If the agent connection drops
// while the VM lives, it reconnects and goes on from where the log stopped.
func (m *Manager) follow(ctx context.Context, id string, inst *vmrun.Instance, offset int64, logs *machinelog.File) (guest.Record, error) {
	add := func(rec guest.Record) error {
		if err := logs.Add(rec); err != nil {
			// A full disk must not kill the machine; the output is lost, the workload not.
			m.logf("machine %s: storing output: %v", id, err)
		}
		return nil
	}
	for attempt := 0; ; attempt++ {
		last, err := inst.Agent.Follow(ctx, "workload", offset, true, add)
		if err == nil || ctx.Err() != nil || attempt == 3 {
			return last, err
		}
		select {
		case <-inst.VM.Wait():
			return last, err
		default:
		}
		m.logf("machine %s: agent connection lost (%v); reconnecting", id, err)
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		c, derr := guest.Dial(dctx, inst.VM.DialAgent)
		cancel()
		if derr != nil {
			return last, err
		}
		inst.Agent.Close()
		inst.Agent = c
		offset = logs.Offset()
	}
}

// signalAndWait gives the workload the stop signal (the request's, else the config's
// stop_config.signal) and up to the timeout to exit on its own, storing what it prints
// meanwhile. ok says it exited, with last carrying its status.
func (m *Manager) signalAndWait(id string, r *run, inst *vmrun.Instance, cfg api.MachineConfig, logs *machinelog.File) (last guest.Record, ok bool) {
	r.mu.Lock()
	sig, timeout := r.stopSignal, r.stopTimeout
	r.mu.Unlock()
	if sig == 0 && cfg.StopConfig != nil {
		sig, _ = SignalNumber(cfg.StopConfig.Signal)
	}
	if sig == 0 {
		return last, false
	}
	if timeout == 0 {
		timeout = stopGrace(cfg)
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(m.ctx), timeout)
	defer cancel()
	if err := inst.Agent.SignalSupervised(ctx, "workload", sig); err != nil {
		return last, false
	}
	last, err := m.follow(ctx, id, inst, logs.Offset(), logs)
	return last, err == nil && last.Exit != nil
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

func (r *run) suspendRequested() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.suspending
}

// suspend saves a machine's VM; if that fails the machine is stopped instead, and its
// events say why.
func (m *Manager) suspend(id string, inst *vmrun.Instance, cfg api.MachineConfig) {
	ctx := context.WithoutCancel(m.ctx)
	if err := inst.Suspend(ctx); err != nil {
		m.logf("machine %s: suspend failed, stopping it instead: %v", id, err)
		inst.Shutdown(ctx, stopGrace(cfg))
		m.transition(id, machine.Suspending, machine.Stopped, "suspend-failed", nil)
		return
	}
	m.mu.Lock()
	m.saved[id] = inst
	m.mu.Unlock()
	m.transition(id, machine.Suspending, machine.Suspended, "suspend", nil)
}

// resume brings back a suspended machine's VM, or returns nil (and says why in the
// events) so that the machine boots cold.
func (m *Manager) resume(id string) *vmrun.Instance {
	m.mu.Lock()
	inst := m.saved[id]
	delete(m.saved, id)
	m.mu.Unlock()
	if inst == nil {
		return nil
	}
	if err := inst.Resume(m.ctx); err != nil {
		m.logf("machine %s: resume failed, booting it cold: %v", id, err)
		m.Store.Note(context.WithoutCancel(m.ctx), id, machine.Event{Type: "resume-failed-cold-boot", Source: "kiln"})
		inst.Destroy(context.WithoutCancel(m.ctx))
		return nil
	}
	return inst
}

func (r *run) requestStop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopping = true
	if r.cancel != nil {
		r.cancel() // ends a wait for room, or the wait on the workload
	}
}

// settle finishes what a supervisor that has ended left in between: a stop it did not
// see through, or a start it never finished.
func (m *Manager) settle(id string) {
	if m.ctx.Err() != nil {
		return
	}
	rec, err := m.Store.GetMachine(m.ctx, id)
	if err != nil {
		return
	}
	switch rec.State {
	case machine.Stopping, machine.Started:
		// No supervisor means no VM: the machine is not running, whatever it says.
		m.finishStop(id, nil)
	case machine.Starting:
		m.transition(id, machine.Starting, machine.Failed, "start", nil)
	case machine.Suspending:
		m.transition(id, machine.Suspending, machine.Stopped, "suspend-failed", nil)
	}
}

// finishStop brings a machine whose VM is gone to stopped, through stopping.
func (m *Manager) finishStop(id string, code *int) {
	rec, err := m.Store.GetMachine(m.ctx, id)
	if err != nil {
		return
	}
	if rec.State == machine.Started || rec.State == machine.Starting {
		if m.transition(id, rec.State, machine.Stopping, "stop", code) != nil {
			return
		}
		rec.State = machine.Stopping
	}
	if rec.State == machine.Stopping {
		m.transition(id, machine.Stopping, machine.Stopped, "stop", code)
	}
}

func stopGrace(cfg api.MachineConfig) time.Duration {
	if cfg.StopConfig != nil {
		if d, err := time.ParseDuration(cfg.StopConfig.Timeout); err == nil && d > 0 {
			return d
		}
	}
	return 10 * time.Second
}

// reserve holds room for the machine, waiting in the capacity queue (with its position
// in the events) when there is none.
func (m *Manager) reserve(ctx context.Context, id string, cfg api.MachineConfig) error {
	if m.Capacity == nil {
		return nil
	}
	size := capacity.Size{CPUs: cfg.Guest.CPUs, MemoryMiB: cfg.Guest.MemoryMB}
	_, err := m.Capacity.Reserve(ctx, id, capacity.Request{Size: size}, m.CapacityWait, func(pos int, why error) {
		m.logf("machine %s waits for capacity (position %d): %v", id, pos, why)
		m.Store.Note(context.WithoutCancel(m.ctx), id, machine.Event{Type: "capacity-queued", Source: "kiln",
			Message: fmt.Sprintf("position %d in the capacity queue (waits up to %s): %v", pos, m.CapacityWait, why)})
	})
	return err
}

// boot starts the machine's VM, with its volumes, and its workload.
func (m *Manager) boot(rec store.Machine, cfg api.MachineConfig) (*vmrun.Instance, error) {
	id := rec.ID
	rfs, err := m.rootfs(m.ctx, cfg.Image)
	if err != nil {
		return nil, err
	}
	var mounts []vmrun.Mount
	for _, mt := range cfg.Mounts {
		v, err := m.Store.GetVolume(m.ctx, rec.App, mt.Volume)
		if err != nil {
			return nil, err
		}
		mt := vmrun.Mount{Image: v.Path, Path: mt.Path}
		if w := workload(cfg, rfs.Run); w.UID != 0 || w.GID != 0 {
			mt.Owner = &vmrun.Owner{UID: w.UID, GID: w.GID}
		}
		mounts = append(mounts, mt)
	}
	spec := vmrun.Spec{Rootfs: rfs.Path, CPUs: cfg.Guest.CPUs, MemoryMiB: cfg.Guest.MemoryMB, Owner: id, Hostname: id, Mounts: mounts}
	if m.Net != nil {
		l, err := m.Net.Attach(m.ctx, rec.App, id)
		if err != nil {
			return nil, fmt.Errorf("private network: %w", err)
		}
		spec.NICs = []vmm.NIC{{HostDev: l.TAP, MAC: l.MAC}}
		spec.Cmdline = l.Cmdline()
	}
	inst, err := m.RT.Boot(m.ctx, spec)
	if err != nil {
		return nil, err
	}
	w := workload(cfg, rfs.Run)
	if len(w.Argv) == 0 {
		inst.Destroy(context.WithoutCancel(m.ctx))
		return nil, errdefs.Invalid("image %s has no command and config.init sets none", cfg.Image)
	}
	if _, err := inst.Agent.Spawn(m.ctx, "workload", w); err != nil {
		inst.Destroy(context.WithoutCancel(m.ctx))
		return nil, err
	}
	return inst, nil
}

// Stop stops a machine's workload and VM.
func (m *Manager) Stop(ctx context.Context, id string) error { return m.StopWith(ctx, id, 0, 0) }

// StopWith stops a machine, first sending sig to its workload and giving it timeout to
// exit (zero values: the config's stop_config, else power off at once).
func (m *Manager) StopWith(ctx context.Context, id string, sig int, timeout time.Duration) error {
	to, err := m.act(ctx, id, machine.ActionStop)
	if err != nil {
		return err
	}
	m.mu.Lock()
	r := m.runs[id]
	if r != nil {
		r.mu.Lock()
		r.stopping, r.stopSignal, r.stopTimeout = true, sig, timeout
		if r.cancel != nil {
			r.cancel()
		}
		r.mu.Unlock()
	}
	m.mu.Unlock()
	if r == nil {
		// Nothing runs it (its VM is gone, or saved by a suspend, which a stop discards):
		// the stop is complete.
		m.discardSaved(id)
		return m.Store.Transition(ctx, id, to, machine.Stopped, machine.Event{Type: "stop", Source: "kiln"})
	}
	return nil
}

// discardSaved removes a suspended machine's saved VM.
func (m *Manager) discardSaved(id string) {
	m.mu.Lock()
	saved := m.saved[id]
	delete(m.saved, id)
	m.mu.Unlock()
	if saved != nil {
		saved.Destroy(context.WithoutCancel(m.ctx))
	}
}

// Suspend saves a started machine's VM to disk and ends its VMM; Start resumes it where
// it was.
func (m *Manager) Suspend(ctx context.Context, id string) error {
	if !m.RT.Driver.Capabilities().Snapshot {
		return errdefs.Invalid("the %s driver cannot suspend machines: stop it instead", m.RT.Driver.Name())
	}
	if _, err := m.act(ctx, id, machine.ActionSuspend); err != nil {
		return err
	}
	m.mu.Lock()
	r := m.runs[id]
	if r != nil {
		r.mu.Lock()
		r.suspending = true
		if r.cancel != nil {
			r.cancel()
		}
		r.mu.Unlock()
	}
	m.mu.Unlock()
	if r == nil {
		return m.Store.Transition(ctx, id, machine.Suspending, machine.Stopped, machine.Event{Type: "suspend-failed", Source: "kiln"})
	}
	return nil
}

// Destroy removes a machine. A running one needs force, as with Fly.
func (m *Manager) Destroy(ctx context.Context, id string, force bool) error {
	rec, err := m.Store.GetMachine(ctx, id)
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
		if err := m.Stop(ctx, id); err != nil && !errors.Is(err, errdefs.ErrConflict) {
			return err
		}
	}
	m.mu.Lock()
	r := m.runs[id]
	m.mu.Unlock()
	if r != nil {
		// Between an exit and a policy restart the machine is stopped but its run lives:
		// keep it from restarting, then wait for it to end.
		r.requestStop()
		select {
		case <-r.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	rec, err = m.Store.GetMachine(ctx, id)
	if err != nil {
		return err
	}
	return m.destroyRecord(id, rec.State)
}

func (m *Manager) destroyRecord(id string, from machine.State) error {
	ctx := context.WithoutCancel(m.ctx)
	m.discardSaved(id) // the snapshot goes with the machine
	if err := m.Store.Transition(ctx, id, from, machine.Destroying, machine.Event{Type: "destroy", Source: "user"}); err != nil {
		return err
	}
	return m.finishDestroy(ctx, id)
}

// finishDestroy takes a destroying machine to destroyed. Every step is safe to redo, so
// Recover calls it for a destroy that a crash cut short.
func (m *Manager) finishDestroy(ctx context.Context, id string) error {
	// Volumes outlive their machine: all it holds are let go, whatever its config names.
	if err := m.Store.DetachVolumes(ctx, id); err != nil {
		return fmt.Errorf("destroying machine %s: detaching its volumes: %w", id, err)
	}
	os.RemoveAll(m.LogDir(id))
	if m.Net != nil {
		if err := m.Net.Detach(ctx, id); err != nil {
			m.logf("machine %s: removing its network device: %v (kiln removes it at its next restart)", id, err)
		}
	}
	return m.Store.Transition(ctx, id, machine.Destroying, machine.Destroyed, machine.Event{Type: "destroy", Source: "kiln"})
}

// Wait waits until the machine is in state, or the timeout passes (ErrUnavailable).
func (m *Manager) Wait(ctx context.Context, id string, state machine.State, timeout time.Duration) error {
	if !state.Valid() {
		return errdefs.Invalid("state %q is not a machine state", state)
	}
	deadline := time.Now().Add(timeout)
	for {
		rec, err := m.Store.GetMachine(ctx, id)
		if err != nil {
			return err
		}
		if rec.State == state {
			return nil
		}
		if time.Now().After(deadline) {
			return errdefs.New(errdefs.ErrUnavailable, "machine %s is %s, not %s, after %s", id, rec.State, state, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// running returns the VM of a machine whose workload runs now, and how its execs run;
// nil if none.
func (m *Manager) running(id string) (*vmrun.Instance, guest.ExecRequest) {
	m.mu.Lock()
	r := m.runs[id]
	m.mu.Unlock()
	if r == nil {
		return nil, guest.ExecRequest{}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.inst, r.as
}

// Signal delivers a signal to a started machine's workload.
func (m *Manager) Signal(ctx context.Context, id string, sig int) error {
	inst, _ := m.running(id)
	if inst == nil {
		return errdefs.New(errdefs.ErrConflict, "machine %s is not running: nothing to signal", id)
	}
	return inst.Agent.SignalSupervised(ctx, "workload", sig)
}

// Update replaces a machine's config with a new version. A running machine is stopped
// and started again on the new config.
func (m *Manager) Update(ctx context.Context, id string, cfg api.MachineConfig) (store.Machine, error) {
	if err := validate(&cfg); err != nil {
		return store.Machine{}, err
	}
	if _, err := m.rootfs(ctx, cfg.Image); err != nil {
		return store.Machine{}, err
	}
	rec, err := m.Store.GetMachine(ctx, id)
	if err != nil {
		return rec, err
	}
	if err := m.checkPorts(ctx, rec.App, id, cfg); err != nil {
		return rec, err
	}
	if !reflect.DeepEqual(cfg.Mounts, config(rec).Mounts) {
		return rec, errdefs.Invalid("config.mounts cannot change on update yet: create a new machine for other volumes")
	}
	wasRunning := rec.State == machine.Started || rec.State == machine.Starting
	if wasRunning {
		if err := m.Stop(ctx, id); err != nil {
			return rec, err
		}
		if err := m.Wait(ctx, id, machine.Stopped, 2*time.Minute); err != nil {
			return rec, err
		}
		m.mu.Lock()
		r := m.runs[id]
		m.mu.Unlock()
		if r != nil {
			select {
			case <-r.done:
			case <-ctx.Done():
				return rec, ctx.Err()
			}
		}
	}
	raw, _ := json.Marshal(cfg)
	// From the version read above: an update that raced this one is not overwritten.
	if err := m.Store.UpdateConfig(ctx, id, rec.Version, raw); err != nil {
		if wasRunning {
			// Refused: the machine runs again as it was (unless the update that won
			// started it already).
			if serr := m.Start(ctx, id); serr != nil && !errors.Is(serr, errdefs.ErrConflict) {
				m.logf("machine %s: starting it again after a refused update: %v", id, serr)
			}
		}
		return rec, err
	}
	if wasRunning {
		if err := m.Start(ctx, id); err != nil {
			return rec, err
		}
	}
	return m.Store.GetMachine(ctx, id)
}

// Drain moves this host's machines elsewhere: each one without volumes is stopped, given
// to the host with the most room and started there. Machines with volumes stay (their
// data is here), as do those nothing else can take; the report says why. The caller
// cordons the host first, so that nothing new comes.
func (m *Manager) Drain(ctx context.Context, hosts store.Hosts) (api.DrainReport, error) {
	rep := api.DrainReport{Host: m.Host, Moved: []api.DrainEntry{}, Kept: []api.DrainEntry{}}
	apps, err := m.Store.ListApps(ctx)
	if err != nil {
		return rep, err
	}
	for _, app := range apps {
		ms, err := m.Store.ListMachines(ctx, app)
		if err != nil {
			return rep, err
		}
		for _, rec := range ms {
			if !m.Mine(rec) || rec.State == machine.Destroyed || rec.State == machine.Destroying {
				continue
			}
			keep := func(why string) { rep.Kept = append(rep.Kept, api.DrainEntry{Machine: rec.ID, Why: why}) }
			cfg := config(rec)
			if len(cfg.Mounts) > 0 {
				keep("its volumes live on this host")
				continue
			}
			if m.Place == nil || hosts == nil {
				keep("no other host shares this host's database")
				continue
			}
			to, err := m.Place(ctx, capacity.Size{CPUs: cfg.Guest.CPUs, MemoryMiB: cfg.Guest.MemoryMB})
			if err == nil && to == m.Host {
				err = fmt.Errorf("no other host has room")
			}
			if err != nil {
				keep(err.Error())
				continue
			}
			wasRunning := rec.State != machine.Stopped && rec.State != machine.Failed && rec.State != machine.Created
			if wasRunning {
				if err := m.Stop(ctx, rec.ID); err != nil && !errors.Is(err, errdefs.ErrConflict) {
					keep("stopping it: " + err.Error())
					continue
				}
				if err := m.Wait(ctx, rec.ID, machine.Stopped, 2*time.Minute); err != nil {
					keep("stopping it: " + err.Error())
					continue
				}
			}
			if err := hosts.MoveMachine(ctx, rec.ID, to); err != nil {
				keep(err.Error())
				continue
			}
			if m.Net != nil {
				m.Net.Detach(ctx, rec.ID)
			}
			m.Store.Note(ctx, rec.ID, machine.Event{Type: "moved", Source: "kiln", Message: fmt.Sprintf("drained from host %s to host %s", m.Host, to)})
			if wasRunning {
				// The new host claims it.
				m.act(ctx, rec.ID, machine.ActionStart)
			}
			rep.Moved = append(rep.Moved, api.DrainEntry{Machine: rec.ID, To: to})
		}
	}
	return rep, nil
}

// Claim starts the machines other hosts placed here: those starting on this host that no
// supervisor runs (a start made here launches at once, so the grace keeps them apart).
func (m *Manager) Claim(ctx context.Context) {
	apps, err := m.Store.ListApps(ctx)
	if err != nil {
		return
	}
	for _, app := range apps {
		ms, err := m.Store.ListMachines(ctx, app)
		if err != nil {
			continue
		}
		for _, rec := range ms {
			if rec.State != machine.Starting || rec.Host != m.Host || m.Host == "" || time.Since(rec.UpdatedAt) < 2*time.Second {
				continue
			}
			m.mu.Lock()
			_, running := m.runs[rec.ID]
			m.mu.Unlock()
			if !running {
				m.logf("machine %s was placed on this host: starting it", rec.ID)
				m.launch(rec.ID, nil)
			}
		}
	}
}

// UsageByHost sums what the machines holding room (starting to suspending) ask for, per
// host, from the store.
func (m *Manager) UsageByHost(ctx context.Context) (map[string]capacity.Size, error) {
	out := map[string]capacity.Size{}
	apps, err := m.Store.ListApps(ctx)
	if err != nil {
		return nil, err
	}
	for _, app := range apps {
		ms, err := m.Store.ListMachines(ctx, app)
		if err != nil {
			return nil, err
		}
		for _, rec := range ms {
			switch rec.State {
			case machine.Starting, machine.Started, machine.Stopping, machine.Suspending:
			default:
				continue
			}
			cfg := config(rec)
			u := out[rec.Host]
			u.CPUs += cfg.Guest.CPUs
			u.MemoryMiB += cfg.Guest.MemoryMB
			out[rec.Host] = u
		}
	}
	return out, nil
}

// Mine says whether this host runs the machine.
func (m *Manager) Mine(rec store.Machine) bool { return rec.Host == "" || rec.Host == m.Host }

// PrivateIP is the machine's address on its app's network, if it has one.
func (m *Manager) PrivateIP(id string) string {
	if m.Net == nil {
		return ""
	}
	if l, ok := m.Net.Lookup(id); ok {
		return l.Addr.Addr().String()
	}
	return ""
}

// LogDir is where a machine's output is stored.
func (m *Manager) LogDir(id string) string { return filepath.Join(m.Dir, id) }

// Close stops supervising and lets go of every VM without stopping it: the next kiln
// adopts them.
func (m *Manager) Close() {
	m.cancel()
	m.wg.Wait()
}

// Recover reconciles the host with the store after a (re)start: VMs of machines that
// should run are adopted and followed again; machines whose VM died are handled by their
// restart policy; VMs no running machine owns are destroyed and reported.
func (m *Manager) Recover(ctx context.Context) error {
	apps, err := m.Store.ListApps(ctx)
	if err != nil {
		return err
	}
	if m.Net != nil {
		// Devices first: VMs about to be adopted or resumed need their TAP devices, and
		// those of machines gone while kiln was down must go.
		exists := map[string]bool{}
		for _, app := range apps {
			ms, err := m.Store.ListMachines(ctx, app)
			if err != nil {
				return err
			}
			for _, rec := range ms {
				if rec.State != machine.Destroyed && rec.State != machine.Destroying && m.Mine(rec) {
					exists[rec.ID] = true
				}
			}
		}
		if err := m.Net.Reconcile(ctx, func(id string) bool { return exists[id] }); err != nil {
			return fmt.Errorf("restoring machines' networks: %w", err)
		}
	}
	owned, err := m.RT.ListOwned()
	if err != nil {
		return err
	}
	haveVM := map[string]bool{}
	for _, o := range owned {
		if ctx.Err() != nil {
			return ctx.Err() // interrupted: leave the rest for the next start
		}
		rec, err := m.Store.GetMachine(ctx, o.Owner)
		if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			return fmt.Errorf("reading machine %s: %w", o.Owner, err)
		}
		if err == nil && rec.State == machine.Suspended {
			inst, serr := m.RT.Saved(ctx, o.ID)
			if serr != nil {
				m.logf("machine %s: its saved VM %s is unusable (%v); it will boot cold", o.Owner, o.ID, serr)
				if inst != nil {
					inst.Destroy(context.WithoutCancel(ctx))
				}
				m.Store.Note(ctx, o.Owner, machine.Event{Type: "resume-failed-cold-boot", Source: "kiln"})
				continue
			}
			m.mu.Lock()
			m.saved[o.Owner] = inst
			m.mu.Unlock()
			haveVM[o.Owner] = true
			continue
		}
		live := err == nil && (rec.State == machine.Started || rec.State == machine.Stopping)
		if !live {
			inst, _ := m.RT.Adopt(ctx, o.ID)
			if inst != nil {
				inst.Destroy(context.WithoutCancel(ctx))
			}
			m.logf("destroyed VM %s: no running machine owns it (owner %s)", o.ID, o.Owner)
			continue
		}
		inst, aerr := m.RT.Adopt(ctx, o.ID)
		if aerr != nil {
			if ctx.Err() != nil {
				if inst != nil {
					inst.Release()
				}
				return ctx.Err()
			}
			// Its VMM is gone or its agent does not answer: the machine is handled below
			// like one whose VM died.
			m.logf("machine %s: its VM %s cannot be adopted: %v", o.Owner, o.ID, aerr)
			if inst != nil {
				inst.Destroy(context.WithoutCancel(ctx))
			}
			continue
		}
		haveVM[o.Owner] = true
		m.logf("machine %s: re-adopted its running VM %s", o.Owner, o.ID)
		if rec.State == machine.Stopping {
			// A stop was under way when kiln went down: finish it.
			inst.Shutdown(context.WithoutCancel(ctx), stopGrace(config(rec)))
			m.transition(o.Owner, machine.Stopping, machine.Stopped, "stop", nil)
			continue
		}
		m.launch(o.Owner, inst)
	}
	// Machines that should be running but whose VM is gone.
	for _, app := range apps {
		ms, err := m.Store.ListMachines(ctx, app)
		if err != nil {
			continue
		}
		for _, rec := range ms {
			if haveVM[rec.ID] || !m.Mine(rec) {
				continue
			}
			switch rec.State {
			case machine.Starting:
				m.logf("machine %s: was starting when kiln stopped; starting it again", rec.ID)
				m.launch(rec.ID, nil)
			case machine.Started:
				m.logf("machine %s: its VM is gone; applying its restart policy", rec.ID)
				m.transition(rec.ID, machine.Started, machine.Stopping, "exit", nil)
				m.transition(rec.ID, machine.Stopping, machine.Stopped, "stop", nil)
				cfg := config(rec)
				if (machine.RestartPolicy{Policy: cfg.Restart.Policy, MaxRetries: cfg.Restart.MaxRetries}).ShouldRestart(-1, 0) {
					if m.transition(rec.ID, machine.Stopped, machine.Starting, "restart", nil) == nil {
						m.launch(rec.ID, nil)
					}
				}
			case machine.Stopping:
				m.transition(rec.ID, machine.Stopping, machine.Stopped, "stop", nil)
			case machine.Destroying:
				// Kiln stopped part-way through a destroy; the steps left are safe to redo.
				if err := m.finishDestroy(ctx, rec.ID); err != nil {
					m.logf("machine %s: finishing its destroy: %v", rec.ID, err)
				}
			}
		}
	}
	m.releaseOrphanVolumes(ctx, apps)
	return nil
}

// releaseOrphanVolumes lets go of volumes held by machines that do not exist or are
// destroyed: claims that a kiln older than the one-transaction create, or a crash in a
// destroy, left behind. Such a volume could otherwise never be attached again.
func (m *Manager) releaseOrphanVolumes(ctx context.Context, apps []string) {
	for _, app := range apps {
		vs, err := m.Store.ListVolumes(ctx, app)
		if err != nil {
			continue
		}
		for _, v := range vs {
			if v.AttachedMachine == "" {
				continue
			}
			rec, err := m.Store.GetMachine(ctx, v.AttachedMachine)
			if err == nil && rec.State != machine.Destroyed {
				continue
			}
			if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
				continue
			}
			m.logf("volume %s: releasing it from machine %s, which is gone", v.Name, v.AttachedMachine)
			if err := m.Store.DetachVolumes(ctx, v.AttachedMachine); err != nil {
				m.logf("volume %s: %v", v.Name, err)
			}
		}
	}
}
