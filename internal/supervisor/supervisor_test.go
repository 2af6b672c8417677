package supervisor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/reqid"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// fakeRuntime is a runtime whose VMs are goroutine-free values: a test says when a
// workload exits and whether boots, saves and resumes work.
type fakeRuntime struct {
	mu        sync.Mutex
	boots     int
	bootIDs   []string // the request id each boot's context carried
	bootErr   error
	saveErr   error
	resumeErr error
	saved     map[string]*fakeVM
	running   map[string]*fakeVM
	owned     []Owned
	adoptErr  error
	destroyed []string
	// exitOnSignal: a signalled workload exits with 128+signal.
	exitOnSignal bool
	// saving, if set, gets each save as it begins, which then waits for saved.
	saving chan string
	saveGo chan struct{}
}

type fakeVM struct {
	rt       *fakeRuntime
	id       string
	exit     chan int
	off      bool
	released bool
}

func newFakeRuntime() *fakeRuntime {
	return &fakeRuntime{saved: map[string]*fakeVM{}, running: map[string]*fakeVM{}}
}

func (f *fakeRuntime) vm(id string) *fakeVM {
	v := &fakeVM{rt: f, id: id, exit: make(chan int, 1)}
	f.running[id] = v
	return v
}

func (f *fakeRuntime) Boot(ctx context.Context, rec store.Machine, cfg api.MachineConfig) (VM, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.boots++
	f.bootIDs = append(f.bootIDs, reqid.From(ctx))
	if f.bootErr != nil {
		return nil, f.bootErr
	}
	return f.vm(rec.ID), nil
}

func (f *fakeRuntime) Resume(ctx context.Context, id string) (VM, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v := f.saved[id]
	delete(f.saved, id)
	if v == nil {
		return nil, nil
	}
	if f.resumeErr != nil {
		return nil, f.resumeErr
	}
	f.running[id] = v
	return v, nil
}

func (f *fakeRuntime) Saved(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.saved[id] != nil
}

func (f *fakeRuntime) Discard(ctx context.Context, id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.saved, id)
}

func (f *fakeRuntime) Owned(ctx context.Context) ([]Owned, error) { return f.owned, nil }

func (f *fakeRuntime) Adopt(ctx context.Context, o Owned, rec store.Machine) (VM, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.adoptErr != nil {
		f.destroyed = append(f.destroyed, o.ID)
		return nil, f.adoptErr
	}
	return f.vm(o.Owner), nil
}

func (f *fakeRuntime) Restore(ctx context.Context, o Owned) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.saved[o.Owner] = &fakeVM{rt: f, id: o.Owner, exit: make(chan int, 1)}
	return nil
}

func (f *fakeRuntime) DestroyOwned(ctx context.Context, o Owned) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.destroyed = append(f.destroyed, o.ID)
}

func (v *fakeVM) Follow(ctx context.Context, offset int64, add func(guest.Record) error) (*int, error) {
	add(guest.Record{Offset: offset, Stream: 1, Data: []byte("hello\n")})
	select {
	case c := <-v.exit:
		return &c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (v *fakeVM) Signal(ctx context.Context, sig int) error {
	if v.rt.exitOnSignal {
		v.exit <- 128 + sig
	}
	return nil
}

func (v *fakeVM) PowerOff(ctx context.Context, grace time.Duration) {
	v.rt.mu.Lock()
	defer v.rt.mu.Unlock()
	v.off = true
	delete(v.rt.running, v.id)
}

func (v *fakeVM) Save(ctx context.Context) error {
	if v.rt.saving != nil {
		v.rt.saving <- v.id
		<-v.rt.saveGo
	}
	v.rt.mu.Lock()
	defer v.rt.mu.Unlock()
	if v.rt.saveErr != nil {
		return v.rt.saveErr
	}
	delete(v.rt.running, v.id)
	v.rt.saved[v.id] = v
	return nil
}

func (v *fakeVM) Release()                       { v.released = true }
func (v *fakeVM) Sync(ctx context.Context) error { return nil }
func (v *fakeVM) Exec(ctx context.Context, req guest.ExecRequest, pio guest.IO) (*guest.Process, error) {
	return nil, errdefs.New(errdefs.ErrNotImplemented, "fake")
}
func (v *fakeVM) As() guest.ExecRequest { return guest.ExecRequest{} }
func (v *fakeVM) Ps(ctx context.Context) ([]guest.ProcessStat, error) {
	return nil, errdefs.New(errdefs.ErrNotImplemented, "fake")
}

// exit makes machine id's workload exit with code.
func (f *fakeRuntime) exit(t *testing.T, id string, code int) {
	t.Helper()
	f.mu.Lock()
	v := f.running[id]
	f.mu.Unlock()
	if v == nil {
		t.Fatalf("machine %s has no running VM", id)
	}
	v.exit <- code
}

type fixture struct {
	t       *testing.T
	db      *sqlstore.DB
	rt      *fakeRuntime
	sup     *Supervisor
	removed chan string
}

func newFixture(t *testing.T, capacity Capacity) *fixture {
	t.Helper()
	dir := t.TempDir()
	db, err := sqlstore.Open(context.Background(), filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := db.CreateApp(context.Background(), "web"); err != nil {
		t.Fatal(err)
	}
	fx := &fixture{t: t, db: db, rt: newFakeRuntime(), removed: make(chan string, 10)}
	fx.sup = New(Config{Store: db, Runtime: fx.rt, Capacity: capacity, CapacityWait: 50 * time.Millisecond,
		LogDir: filepath.Join(dir, "machines"),
		Remove: func(ctx context.Context, id string) error { fx.removed <- id; return db.DetachVolumes(ctx, id) }})
	t.Cleanup(fx.sup.Close)
	return fx
}

// create records a machine in state, with config.
func (fx *fixture) create(id string, state machine.State, cfg string) {
	fx.t.Helper()
	ctx := context.Background()
	if cfg == "" {
		cfg = `{"image":"localhost/app:1"}`
	}
	if err := fx.db.CreateMachine(ctx, store.Machine{ID: id, App: "web", Name: id, State: machine.Created, Config: []byte(cfg)},
		machine.Event{Type: "launch", Source: "user"}); err != nil {
		fx.t.Fatal(err)
	}
	// Walk the table to the state asked for, as earlier kilns would have.
	path := map[machine.State][]machine.State{
		machine.Starting:   {machine.Starting},
		machine.Started:    {machine.Starting, machine.Started},
		machine.Stopping:   {machine.Starting, machine.Started, machine.Stopping},
		machine.Stopped:    {machine.Starting, machine.Started, machine.Stopping, machine.Stopped},
		machine.Suspending: {machine.Starting, machine.Started, machine.Suspending},
		machine.Suspended:  {machine.Starting, machine.Started, machine.Suspending, machine.Suspended},
		machine.Destroying: {machine.Destroying},
	}[state]
	from := machine.Created
	for _, to := range path {
		if err := fx.db.Transition(ctx, id, from, to, machine.Event{Type: "test", Source: "kiln"}); err != nil {
			fx.t.Fatal(err)
		}
		from = to
	}
}

// apply makes a user's request and fails the test on error.
func (fx *fixture) apply(id string, in machine.Input, req Request) {
	fx.t.Helper()
	if _, err := fx.sup.Apply(context.Background(), id, in, req); err != nil {
		fx.t.Fatalf("%s %s: %v", in, id, err)
	}
}

// wait waits until machine id is in state, listening for state changes.
func (fx *fixture) wait(id string, state machine.State) {
	fx.t.Helper()
	deadline := time.After(2 * time.Second)
	for {
		changed := fx.sup.Changed()
		rec, err := fx.db.GetMachine(context.Background(), id)
		if err != nil {
			fx.t.Fatal(err)
		}
		if rec.State == state {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			fx.t.Fatalf("machine %s is %s, not %s, after 2s; events: %s", id, rec.State, state, fx.events(id))
		}
	}
}

// settled waits until no supervisor runs machine id.
func (fx *fixture) settled(id string) {
	fx.t.Helper()
	if done := fx.sup.Done(id); done != nil {
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			fx.t.Fatalf("machine %s's supervisor did not end", id)
		}
	}
}

// events lists the machine's journal as type:status entries.
func (fx *fixture) events(id string) string {
	evs, _ := fx.db.Events(context.Background(), id)
	out := ""
	for _, e := range evs {
		if e.Type == "launch" || e.Type == "test" {
			continue
		}
		out += fmt.Sprintf("%s:%s", e.Type, e.Status)
		if e.ExitCode != nil {
			out += fmt.Sprintf("(%d)", *e.ExitCode)
		}
		out += " "
	}
	return out
}

func (fx *fixture) wantEvents(id, want string) {
	fx.t.Helper()
	if got := fx.events(id); got != want {
		fx.t.Errorf("events:\n got %s\nwant %s", got, want)
	}
}

func TestStartAndExit(t *testing.T) {
	fx := newFixture(t, nil)
	fx.create("m1", machine.Created, "")
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	if fx.sup.Running("m1") == nil {
		t.Fatal("a started machine has no running VM")
	}
	fx.rt.exit(t, "m1", 3)
	fx.wait("m1", machine.Stopped)
	fx.settled("m1")
	fx.wantEvents("m1", "start:starting start:started exit:stopping(3) stop:stopped(3) ")
}

func TestRestartAlways(t *testing.T) {
	fx := newFixture(t, nil)
	fx.create("m1", machine.Created, `{"image":"localhost/app:1","restart":{"policy":"always"}}`)
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	fx.rt.exit(t, "m1", 0)
	for fx.rt.bootCount() < 2 {
		<-fx.sup.Changed()
	}
	fx.wait("m1", machine.Started)
	fx.apply("m1", machine.InStop, Request{})
	fx.wait("m1", machine.Stopped)
	fx.settled("m1")
	fx.wantEvents("m1", "start:starting start:started exit:stopping(0) stop:stopped(0) restart:starting start:started stop:stopping stop:stopped ")
}

func (f *fakeRuntime) bootCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.boots
}

func TestRestartOnFailureGivesUp(t *testing.T) {
	fx := newFixture(t, nil)
	fx.create("m1", machine.Created, `{"image":"localhost/app:1","restart":{"policy":"on-failure","max_retries":1}}`)
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	fx.rt.exit(t, "m1", 1)
	for fx.rt.bootCount() < 2 {
		<-fx.sup.Changed()
	}
	fx.wait("m1", machine.Started)
	fx.rt.exit(t, "m1", 1)
	fx.settled("m1")
	fx.wait("m1", machine.Stopped)
	if n := fx.rt.bootCount(); n != 2 {
		t.Fatalf("%d boots, want 2 (one retry)", n)
	}
}

func TestBootFailure(t *testing.T) {
	fx := newFixture(t, nil)
	fx.rt.bootErr = errdefs.Invalid("image has no command")
	fx.create("m1", machine.Created, "")
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Failed)
	fx.settled("m1")
	evs, _ := fx.db.Events(context.Background(), "m1")
	if last := evs[len(evs)-1]; last.Message != "image has no command" {
		t.Fatalf("the failure does not say why: %+v", last)
	}
}

// The work a start asks for is done for its API call: the boot's requests to the guest
// carry the call's id, and so does the line that says the boot failed.
func TestBootCarriesTheRequestID(t *testing.T) {
	fx := newFixture(t, nil)
	var logs bytes.Buffer
	fx.sup.cfg.Log = slog.New(slog.NewJSONHandler(&logs, nil))
	fx.rt.bootErr = errdefs.Invalid("image has no command")
	fx.create("m1", machine.Created, "")
	if _, err := fx.sup.Apply(reqid.With(context.Background(), "start-42"), "m1", machine.InStart, Request{}); err != nil {
		t.Fatal(err)
	}
	fx.wait("m1", machine.Failed)
	fx.settled("m1")
	fx.rt.mu.Lock()
	ids := fx.rt.bootIDs
	fx.rt.mu.Unlock()
	if len(ids) != 1 || ids[0] != "start-42" {
		t.Errorf("boot contexts carried %q, want the start's id", ids)
	}
	if !strings.Contains(logs.String(), `"msg":"machine m1 failed to start: image has no command","request_id":"start-42"`) {
		t.Errorf("the failure's line has no request id:\n%s", logs.String())
	}
}

type noRoom struct{}

func (noRoom) Reserve(ctx context.Context, id string, r capacity.Request, wait time.Duration, onQueued func(int, error)) (string, error) {
	onQueued(1, errors.New("cpus: 0 free"))
	select {
	case <-time.After(wait):
		return "", errdefs.New(errdefs.ErrCapacity, "no room after %s", wait)
	case <-ctx.Done():
		return "", ctx.Err()
	}
}
func (noRoom) Hold(string, capacity.Size) {}
func (noRoom) Release(string)             {}

func TestCapacityTimeout(t *testing.T) {
	fx := newFixture(t, noRoom{})
	fx.create("m1", machine.Created, "")
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Failed)
	fx.settled("m1")
	fx.wantEvents("m1", "start:starting capacity-queued:starting capacity:failed ")
	if fx.rt.bootCount() != 0 {
		t.Fatal("booted without room")
	}
}

// A stop while the machine waits for room ends the wait: stopped, never booted.
func TestStopWhileWaitingForRoom(t *testing.T) {
	fx := newFixture(t, noRoom{})
	fx.sup.cfg.CapacityWait = time.Minute
	fx.create("m1", machine.Created, "")
	fx.apply("m1", machine.InStart, Request{})
	fx.apply("m1", machine.InStop, Request{})
	fx.settled("m1")
	fx.wait("m1", machine.Stopped)
	if fx.rt.bootCount() != 0 {
		t.Fatal("booted after the stop")
	}
}

func TestStopWithSignal(t *testing.T) {
	fx := newFixture(t, nil)
	fx.rt.exitOnSignal = true
	fx.create("m1", machine.Created, `{"image":"localhost/app:1","stop_config":{"signal":"SIGTERM","timeout":"5s"}}`)
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	fx.apply("m1", machine.InStop, Request{})
	fx.wait("m1", machine.Stopped)
	fx.settled("m1")
	fx.wantEvents("m1", "start:starting start:started stop:stopping stop:stopped(143) ")
}

func TestSuspendAndResume(t *testing.T) {
	fx := newFixture(t, nil)
	fx.create("m1", machine.Created, "")
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	fx.apply("m1", machine.InSuspend, Request{})
	fx.wait("m1", machine.Suspended)
	fx.settled("m1")
	if !fx.rt.Saved("m1") {
		t.Fatal("no saved VM")
	}
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	if fx.rt.bootCount() != 1 {
		t.Fatal("a resume booted")
	}
	fx.wantEvents("m1", "start:starting start:started suspend:suspending suspend:suspended start:starting resume:started ")
}

// A VM being saved is not handed out (to an exec, a ps or a scrape of its agent): the
// save closes its agent's connection under them.
func TestSavingVMIsNotRunning(t *testing.T) {
	fx := newFixture(t, nil)
	fx.rt.saving, fx.rt.saveGo = make(chan string), make(chan struct{})
	fx.create("m1", machine.Created, "")
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	if fx.sup.Running("m1") == nil || len(fx.sup.RunningVMs()) != 1 {
		t.Fatal("a started machine's VM is not running")
	}
	fx.apply("m1", machine.InSuspend, Request{})
	<-fx.rt.saving
	if fx.sup.Running("m1") != nil || len(fx.sup.RunningVMs()) != 0 {
		t.Error("the VM is handed out while it is saved")
	}
	close(fx.rt.saveGo)
	fx.wait("m1", machine.Suspended)
	fx.settled("m1")
}

func TestSuspendFailureStops(t *testing.T) {
	fx := newFixture(t, nil)
	fx.rt.saveErr = errors.New("disk full")
	fx.create("m1", machine.Created, "")
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	fx.apply("m1", machine.InSuspend, Request{})
	fx.wait("m1", machine.Stopped)
	fx.settled("m1")
	fx.wantEvents("m1", "start:starting start:started suspend:suspending suspend-failed:stopped ")
	if len(fx.rt.running) != 0 {
		t.Fatal("the VM runs on after a failed suspend")
	}
}

func TestResumeFailureBootsCold(t *testing.T) {
	fx := newFixture(t, nil)
	fx.create("m1", machine.Created, "")
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	fx.apply("m1", machine.InSuspend, Request{})
	fx.wait("m1", machine.Suspended)
	fx.settled("m1")
	fx.rt.resumeErr = errors.New("snapshot unreadable")
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	if fx.rt.bootCount() != 2 {
		t.Fatal("no cold boot after a failed resume")
	}
	fx.wantEvents("m1", "start:starting start:started suspend:suspending suspend:suspended start:starting resume-failed-cold-boot:starting start:started ")
}

// A stop of a suspended machine discards its saved VM and completes at once.
func TestStopSuspended(t *testing.T) {
	fx := newFixture(t, nil)
	fx.create("m1", machine.Suspended, "")
	fx.rt.saved["m1"] = &fakeVM{}
	fx.apply("m1", machine.InStop, Request{})
	fx.wait("m1", machine.Stopped)
	if fx.rt.Saved("m1") {
		t.Fatal("the saved VM outlives the stop")
	}
}

func TestDestroy(t *testing.T) {
	fx := newFixture(t, nil)
	fx.create("m1", machine.Stopped, "")
	fx.apply("m1", machine.InDestroy, Request{})
	fx.wait("m1", machine.Destroyed)
	if got := <-fx.removed; got != "m1" {
		t.Fatalf("removed %s", got)
	}
	if _, err := fx.sup.Apply(context.Background(), "m1", machine.InDestroy, Request{}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("destroying twice: %v", err)
	}
}

func TestAutoDestroy(t *testing.T) {
	fx := newFixture(t, nil)
	fx.create("m1", machine.Created, `{"image":"localhost/app:1","auto_destroy":true}`)
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	fx.rt.exit(t, "m1", 0)
	fx.wait("m1", machine.Destroyed)
	fx.settled("m1")
}

// Recover picks each machine up where the last kiln left it, with the same loop.
func TestRecover(t *testing.T) {
	fx := newFixture(t, nil)
	fx.create("adopted", machine.Started, "")
	fx.create("gone", machine.Started, `{"image":"localhost/app:1","restart":{"policy":"always"}}`)
	fx.create("gone-no-policy", machine.Started, "")
	fx.create("stopping", machine.Stopping, "")
	fx.create("starting", machine.Starting, "")
	fx.create("destroying", machine.Destroying, "")
	fx.create("suspended", machine.Suspended, "")
	fx.create("suspending", machine.Suspending, "")
	fx.create("stopped", machine.Stopped, "")
	fx.rt.owned = []Owned{{"vm-a", "adopted"}, {"vm-s", "suspended"}, {"vm-x", "stopped"}, {"vm-y", "nobody"}}
	var all []store.Machine
	ms, _ := fx.db.ListMachines(context.Background(), "web")
	all = append(all, ms...)
	if err := fx.sup.Recover(context.Background(), all); err != nil {
		t.Fatal(err)
	}
	fx.wait("adopted", machine.Started)
	if fx.sup.Running("adopted") == nil {
		t.Fatal("the adopted VM is not followed")
	}
	fx.wait("gone", machine.Started) // restarted by its policy
	fx.wait("gone-no-policy", machine.Stopped)
	fx.wait("stopping", machine.Stopped)
	fx.wait("starting", machine.Started)
	fx.wait("destroying", machine.Destroyed)
	fx.wait("suspending", machine.Stopped)
	fx.wait("suspended", machine.Suspended)
	if !fx.rt.Saved("suspended") {
		t.Fatal("the saved VM was not kept")
	}
	if got := fmt.Sprint(fx.rt.destroyed); got != "[vm-x vm-y]" {
		t.Fatalf("destroyed %s, want the VMs of the stopped machine and of no machine", got)
	}
	fx.wantEvents("gone", "exit:stopping stop:stopped restart:starting start:started ")
	// The adopted machine's exit goes through the same loop as any other.
	fx.rt.exit(t, "adopted", 7)
	fx.wait("adopted", machine.Stopped)
	fx.wantEvents("adopted", "exit:stopping(7) stop:stopped(7) ")
}

// Close lets go of VMs without stopping them, and records nothing.
func TestCloseReleases(t *testing.T) {
	fx := newFixture(t, nil)
	fx.create("m1", machine.Created, "")
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	v := fx.sup.Running("m1").(*fakeVM)
	fx.sup.Close()
	if !v.released || v.off {
		t.Fatalf("released=%v off=%v, want released and running", v.released, v.off)
	}
	rec, _ := fx.db.GetMachine(context.Background(), "m1")
	if rec.State != machine.Started {
		t.Fatalf("state %s after Close, want started", rec.State)
	}
}

// gate is room for everything whose Release blocks until the test opens it: it holds a
// run between its last transition and its end, where requests race it.
type gate struct {
	releasing chan string
	open      chan struct{}
}

func newGate() *gate { return &gate{releasing: make(chan string, 10), open: make(chan struct{})} }

func (g *gate) Reserve(ctx context.Context, id string, r capacity.Request, wait time.Duration, onQueued func(int, error)) (string, error) {
	return "here", nil
}
func (g *gate) Hold(string, capacity.Size) {}
func (g *gate) Release(id string) {
	g.releasing <- id
	<-g.open
}

// A start recorded while the machine's last run is still ending is not lost: a new run
// boots it (it used to be dropped, and the ending run's settle failed the machine).
func TestStartWhileTheLastRunEnds(t *testing.T) {
	g := newGate()
	fx := newFixture(t, g)
	fx.create("m1", machine.Created, "")
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	fx.rt.exit(t, "m1", 0)
	<-g.releasing // the run has recorded stopped and is ending
	fx.wait("m1", machine.Stopped)
	fx.apply("m1", machine.InStart, Request{})
	close(g.open)
	fx.wait("m1", machine.Started)
	if n := fx.rt.bootCount(); n != 2 {
		t.Fatalf("%d boots, want 2", n)
	}
	fx.wantEvents("m1", "start:starting start:started exit:stopping(0) stop:stopped(0) start:starting start:started ")
}

// A stop of a machine suspended by a run that is still ending discards the saved VM:
// the next start boots instead of resuming a VM the user stopped.
func TestStopWhileTheSuspendingRunEnds(t *testing.T) {
	g := newGate()
	fx := newFixture(t, g)
	fx.create("m1", machine.Created, "")
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	fx.apply("m1", machine.InSuspend, Request{})
	<-g.releasing
	fx.wait("m1", machine.Suspended)
	fx.apply("m1", machine.InStop, Request{})
	close(g.open)
	fx.settled("m1")
	fx.wait("m1", machine.Stopped)
	if fx.rt.Saved("m1") {
		t.Fatal("the saved VM outlives the stop")
	}
	fx.apply("m1", machine.InStart, Request{})
	fx.wait("m1", machine.Started)
	if n := fx.rt.bootCount(); n != 2 {
		t.Fatalf("%d boots, want 2 (a cold boot, not a resume)", n)
	}
}
