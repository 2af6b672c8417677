package deploy

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/appconfig"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

func config(t *testing.T, greeting, strategy string) appconfig.Config {
	t.Helper()
	c, err := appconfig.Parse("fly.toml", []byte(fmt.Sprintf(`app = "shop"
[env]
  GREETING = %q
[http_service]
  internal_port = 8080
  [[http_service.checks]]
    interval = "1s"
    path = "/"
[deploy]
  strategy = %q
  max_unavailable = 1
  wait_timeout = "2s"
`, greeting, strategy)))
	if err != nil {
		t.Fatal(err)
	}
	return *c
}

// fakeMachines keeps machines in memory; a machine whose GREETING is "bad" never
// passes its checks.
type fakeMachines struct {
	mu      sync.Mutex
	n       int
	recs    map[string]*store.Machine
	cfgs    map[string]api.MachineConfig
	started map[string]time.Time
	// log records each change, in order: create ID, update ID, destroy ID.
	log []string
	// gate, when set, holds every create until it is closed.
	gate chan struct{}
	// exitCode is what a release command's machine exits with, at once.
	exitCode int
	// maxOut is the most machines of one group out of service at once, seen at updates.
	maxOut int
}

func newFake() *fakeMachines {
	return &fakeMachines{recs: map[string]*store.Machine{}, cfgs: map[string]api.MachineConfig{}, started: map[string]time.Time{}}
}

func (f *fakeMachines) List(_ context.Context, app string) ([]store.Machine, []api.MachineConfig, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var recs []store.Machine
	var cfgs []api.MachineConfig
	for i := 1; i <= f.n; i++ {
		id := fmt.Sprintf("m%d", i)
		if r, ok := f.recs[id]; ok && r.State != machine.Destroyed {
			recs, cfgs = append(recs, *r), append(cfgs, f.cfgs[id])
		}
	}
	return recs, cfgs, nil
}

func (f *fakeMachines) Get(_ context.Context, id string) (store.Machine, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r, ok := f.recs[id]; ok {
		return *r, nil
	}
	return store.Machine{}, errdefs.New(errdefs.ErrNotFound, "no machine %s", id)
}

func (f *fakeMachines) Create(_ context.Context, app string, req api.CreateMachineRequest) (store.Machine, error) {
	cfg := req.Config
	if err := machine.Validate(&cfg); err != nil {
		return store.Machine{}, err
	}
	if f.gate != nil {
		<-f.gate
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n++
	id := fmt.Sprintf("m%d", f.n)
	f.recs[id] = &store.Machine{ID: id, App: app, Name: req.Name, State: machine.Started, Cordoned: req.SkipServiceRegistration}
	if cfg.Metadata[appconfig.ProcessGroupMetadata] == appconfig.ReleaseCommandGroup {
		code := f.exitCode
		f.recs[id].State, f.recs[id].ExitCode = machine.Stopped, &code
	}
	f.cfgs[id], f.started[id] = cfg, time.Now()
	f.log = append(f.log, "create "+id)
	return *f.recs[id], nil
}

func (f *fakeMachines) Update(_ context.Context, id string, req api.CreateMachineRequest) (store.Machine, error) {
	cfg := req.Config
	if err := machine.Validate(&cfg); err != nil {
		return store.Machine{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]int{}
	for mid, r := range f.recs {
		if r.Cordoned && r.State != machine.Destroyed {
			g := f.cfgs[mid].Metadata[MetaGroup]
			out[g]++
			f.maxOut = max(f.maxOut, out[g])
		}
	}
	f.cfgs[id], f.started[id] = cfg, time.Now()
	f.recs[id].State = machine.Started
	f.log = append(f.log, "update "+id)
	return *f.recs[id], nil
}

func (f *fakeMachines) Start(context.Context, string) error { return nil }

func (f *fakeMachines) Destroy(_ context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.recs[id].State = machine.Destroyed
	f.log = append(f.log, "destroy "+id)
	return nil
}

func (f *fakeMachines) SetCordoned(_ context.Context, id string, on bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.recs[id].Cordoned = on
	return nil
}

func (f *fakeMachines) Volume(context.Context, string, string, int) (string, error) {
	return "", errdefs.New(errdefs.ErrNotImplemented, "no volumes here")
}

func (f *fakeMachines) Health(id string) HealthState {
	f.mu.Lock()
	defer f.mu.Unlock()
	r, ok := f.recs[id]
	if !ok || r.State != machine.Started {
		return HealthState{}
	}
	return HealthState{Known: true, StartedAt: f.started[id], Rounds: 1, Passing: f.cfgs[id].Env["GREETING"] != "bad", Cordoned: r.Cordoned}
}

func (f *fakeMachines) greetings() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for i := 1; i <= f.n; i++ {
		id := fmt.Sprintf("m%d", i)
		if f.recs[id].State != machine.Destroyed {
			out = append(out, id+"="+f.cfgs[id].Env["GREETING"])
		}
	}
	return out
}

func newEngine(t *testing.T) (*Engine, *fakeMachines, *sqlstore.DB) {
	db, err := sqlstore.Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := db.CreateApp(context.Background(), "shop"); err != nil {
		t.Fatal(err)
	}
	f := newFake()
	return &Engine{Store: db, Machines: f, Health: f, Poll: 10 * time.Millisecond, Drain: time.Second}, f, db
}

func deployAndWait(t *testing.T, e *Engine, cfg appconfig.Config, counts map[string]int) store.Release {
	t.Helper()
	rel, _, err := e.Deploy(context.Background(), "shop", Spec{Config: cfg, Image: "localhost/app:1", Counts: counts}, "tok", 0)
	if err != nil {
		t.Fatal(err)
	}
	e.Wait()
	rel, err = e.Store.GetRelease(context.Background(), "shop", rel.Version)
	if err != nil {
		t.Fatal(err)
	}
	return rel
}

// The plan of a changed env var names that field alone, for each machine; counts make
// creates and destroys; bluegreen replaces.
func TestPlanShowsTheExactDiff(t *testing.T) {
	e, f, _ := newEngine(t)
	if rel := deployAndWait(t, e, config(t, "v1", "rolling"), map[string]int{"app": 2}); rel.State != store.ReleaseSucceeded {
		t.Fatalf("release 1: %+v", rel)
	}
	p, err := e.Plan(context.Background(), "shop", Spec{Config: config(t, "v2", "rolling"), Image: "localhost/app:1", Counts: map[string]int{"app": 2}})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Steps) != 2 {
		t.Fatalf("plan: %+v", p)
	}
	for _, s := range p.Steps {
		want := []FieldDiff{{Path: "env.GREETING", Old: `"v1"`, New: `"v2"`}}
		if s.Change != Update || fmt.Sprint(s.Diff) != fmt.Sprint(want) {
			t.Fatalf("step %+v: want an update with exactly %v", s, want)
		}
	}
	p, _ = e.Plan(context.Background(), "shop", Spec{Config: config(t, "v1", "rolling"), Image: "localhost/app:1", Counts: map[string]int{"app": 3}})
	if n := p.Changes(); n[None] != 2 || n[Create] != 1 {
		t.Fatalf("scale to 3: %v", n)
	}
	p, _ = e.Plan(context.Background(), "shop", Spec{Config: config(t, "v1", "rolling"), Image: "localhost/app:1", Counts: map[string]int{"app": 1}})
	if n := p.Changes(); n[None] != 1 || n[Destroy] != 1 {
		t.Fatalf("scale to 1: %v", n)
	}
	p, _ = e.Plan(context.Background(), "shop", Spec{Config: config(t, "v2", "bluegreen"), Image: "localhost/app:1", Counts: map[string]int{"app": 2}})
	if n := p.Changes(); n[Replace] != 2 {
		t.Fatalf("bluegreen: %v", n)
	}
	if got := f.greetings(); fmt.Sprint(got) != "[m1=v1 m2=v1]" {
		t.Fatalf("a plan changed machines: %v", got)
	}
}

// Rolling goes one machine at a time; a check that never passes rolls the app back to
// the previous release; bluegreen makes every new machine before destroying any old one.
func TestStrategiesAndRollback(t *testing.T) {
	e, f, _ := newEngine(t)
	deployAndWait(t, e, config(t, "v1", "rolling"), map[string]int{"app": 2})
	f.log = nil
	if rel := deployAndWait(t, e, config(t, "v2", "rolling"), nil); rel.State != store.ReleaseSucceeded {
		t.Fatalf("release 2: %+v", rel)
	}
	if got := strings.Join(f.log, ","); got != "update m1,update m2" {
		t.Fatalf("rolling: %s", got)
	}
	rel := deployAndWait(t, e, config(t, "bad", "rolling"), nil)
	if rel.State != store.ReleaseRolledBack || !strings.Contains(rel.Message, "release 2 serves again") || !strings.Contains(rel.Message, "health checks fail") {
		t.Fatalf("release 3 with a failing check: %+v", rel)
	}
	if got := f.greetings(); fmt.Sprint(got) != "[m1=v2 m2=v2]" {
		t.Fatalf("after the rollback: %v", got)
	}
	for _, id := range []string{"m1", "m2"} {
		if m, _ := f.Get(context.Background(), id); m.Cordoned {
			t.Fatalf("%s was left out of service after the rollback", id)
		}
	}
	f.log = nil
	if rel := deployAndWait(t, e, config(t, "v4", "bluegreen"), nil); rel.State != store.ReleaseSucceeded {
		t.Fatalf("bluegreen: %+v", rel)
	}
	if got := strings.Join(f.log, ","); got != "create m3,create m4,destroy m1,destroy m2" {
		t.Fatalf("bluegreen: %s", got)
	}
	if got := f.greetings(); fmt.Sprint(got) != "[m3=v4 m4=v4]" {
		t.Fatalf("after bluegreen: %v", got)
	}
	// The first deploy of a failing check has nothing to roll back to: it fails.
	e2, _, _ := newEngine(t)
	if rel := deployAndWait(t, e2, config(t, "bad", "rolling"), nil); rel.State != store.ReleaseFailed || !strings.Contains(rel.Message, "no earlier release") {
		t.Fatalf("first release failing: %+v", rel)
	}
}

// A deploy a stopped server left running is resumed from the machines as they are, and
// says so; one stopped in its release command is ended without changes.
func TestResume(t *testing.T) {
	e, f, db := newEngine(t)
	deployAndWait(t, e, config(t, "v1", "rolling"), map[string]int{"app": 2})
	ctx := context.Background()
	// As a killed server leaves it: release 2 recorded, converging, one machine done.
	spec, _ := json.Marshal(Spec{Config: config(t, "v2", "rolling"), Image: "localhost/app:1", Counts: map[string]int{"app": 2}})
	prog, _ := json.Marshal(Progress{Phase: "converge"})
	rel, err := db.CreateRelease(ctx, store.Release{App: "shop", State: store.ReleaseRunning, Strategy: "rolling", Image: "localhost/app:1", Config: spec, Progress: prog})
	if err != nil {
		t.Fatal(err)
	}
	desired, _ := Desired(Spec{Config: config(t, "v2", "rolling"), Image: "localhost/app:1"}, rel.Version, 0)
	f.Update(ctx, "m1", api.CreateMachineRequest{Config: desired["app"]})
	f.SetCordoned(ctx, "m1", true)
	f.log = nil
	if err := e.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	e.Wait()
	got, _ := db.GetRelease(ctx, "shop", rel.Version)
	if got.State != store.ReleaseSucceeded {
		t.Fatalf("resumed release: %+v", got)
	}
	if l := strings.Join(f.log, ","); l != "update m2" {
		t.Fatalf("the resumed deploy did %q, want only m2's update", l)
	}
	if m, _ := f.Get(ctx, "m1"); m.Cordoned {
		t.Fatal("the machine the killed deploy took out of service was not let back in")
	}
	var p Progress
	json.Unmarshal(got.Progress, &p)
	if p.Resumed != 1 {
		t.Fatalf("progress %+v: want resumed once", p)
	}
	// Stopped while its release command ran: the restarted server waits for that
	// machine (it is not started again), then deploys.
	withCmd := config(t, "v3", "rolling")
	withCmd.Deploy.ReleaseCommand = "migrate --all"
	spec, _ = json.Marshal(Spec{Config: withCmd, Image: "localhost/app:1", Counts: map[string]int{"app": 2}})
	prog, _ = json.Marshal(Progress{Phase: "release_command"})
	rel, _ = db.CreateRelease(ctx, store.Release{App: "shop", State: store.ReleaseRunning, Strategy: "rolling", Config: spec, Progress: prog})
	cmdCfg, _ := withCmd.ReleaseMachineConfig("localhost/app:1")
	running, _ := f.Create(ctx, "shop", api.CreateMachineRequest{Name: fmt.Sprintf("release-command-%d", rel.Version), Config: cmdCfg})
	f.mu.Lock()
	f.recs[running.ID].State, f.recs[running.ID].ExitCode = machine.Stopped, new(int) // it finished meanwhile, exit 0
	f.mu.Unlock()
	f.log = nil
	e.Resume(ctx)
	e.Wait()
	got, _ = db.GetRelease(ctx, "shop", rel.Version)
	if got.State != store.ReleaseSucceeded {
		t.Fatalf("release resumed in its release command: %+v", got)
	}
	if l := strings.Join(f.log, ","); l != "destroy "+running.ID+",update m1,update m2" {
		t.Fatalf("resumed in its release command, the deploy did %q: want the command's machine destroyed (not run again), then the updates", l)
	}
	// A release command that fails stops the deploy before any machine changes.
	withCmd = config(t, "v4", "rolling")
	withCmd.Deploy.ReleaseCommand = "migrate --all"
	f.exitCode = 3
	f.log = nil
	if rel := deployAndWait(t, e, withCmd, nil); rel.State != store.ReleaseFailed || !strings.Contains(rel.Message, "exit code 3") {
		t.Fatalf("failing release command: %+v", rel)
	}
	if len(f.log) != 2 || !strings.HasPrefix(f.log[0], "create ") || !strings.HasPrefix(f.log[1], "destroy ") {
		t.Fatalf("a failing release command changed machines: %v", f.log)
	}
}

// Only one deploy runs per app.
func TestOneDeployAtATime(t *testing.T) {
	e, f, _ := newEngine(t)
	f.gate = make(chan struct{}) // holds the first deploy in its first create
	first, _, err := e.Deploy(context.Background(), "shop", Spec{Config: config(t, "v1", "rolling"), Image: "localhost/app:1"}, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = e.Deploy(context.Background(), "shop", Spec{Config: config(t, "v2", "rolling"), Image: "localhost/app:1"}, "", 0)
	close(f.gate)
	if !strings.Contains(fmt.Sprint(err), fmt.Sprintf("release %d of shop is still deploying", first.Version)) {
		t.Fatalf("second deploy at once: %v", err)
	}
	e.Wait()
}

// A release another host records as deploying holds this host's deploy of the app back,
// until nothing has changed it for longer than any deploy waits.
func TestReleaseRunningElsewhere(t *testing.T) {
	e, _, db := newEngine(t)
	ctx := context.Background()
	other, err := db.CreateRelease(ctx, store.Release{App: "shop", State: store.ReleaseRunning, Strategy: "rolling", Config: []byte(`{}`)})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = e.Deploy(ctx, "shop", Spec{Config: config(t, "v1", "rolling"), Image: "localhost/app:1"}, "", 0)
	if !strings.Contains(fmt.Sprint(err), fmt.Sprintf("release %d of shop is still deploying (on another host)", other.Version)) {
		t.Fatalf("deploy while another host's release runs: %v", err)
	}
}

// Rolling takes max_unavailable of each group's machines out at a time: with two groups
// of two machines and Fly's default 0.33, one machine of a group at a time, never a
// whole group.
func TestRollingIsPerGroup(t *testing.T) {
	e, f, _ := newEngine(t)
	two := func(greeting string) appconfig.Config {
		c, err := appconfig.Parse("fly.toml", []byte(fmt.Sprintf(`app = "shop"
[env]
  GREETING = %q
[processes]
  web = "httpd"
  worker = "work"
[deploy]
  wait_timeout = "2s"
`, greeting)))
		if err != nil {
			t.Fatal(err)
		}
		return *c
	}
	deployAndWait(t, e, two("v1"), map[string]int{"web": 2, "worker": 2})
	if rel := deployAndWait(t, e, two("v2"), nil); rel.State != store.ReleaseSucceeded {
		t.Fatalf("release 2: %+v", rel)
	}
	if f.maxOut != 1 {
		t.Fatalf("%d machines of one group were out of service at once, want 1", f.maxOut)
	}
}

// An update in place keeps the machine's own volume: a deploy names the second and
// later machines' volumes source_N, and the machines service refuses a mount change.
func TestUpdateKeepsTheMachinesVolume(t *testing.T) {
	want := api.MachineConfig{Image: "i", Env: map[string]string{"A": "2"}, Mounts: []api.Mount{{Volume: "data", Path: "/data"}}}
	have := Existing{ID: "m2", Group: "app", State: machine.Started,
		Config: api.MachineConfig{Image: "i", Env: map[string]string{"A": "1"}, Mounts: []api.Mount{{Volume: "data_2", Path: "/data"}}}}
	p := MakePlan("rolling", map[string]api.MachineConfig{"app": want}, nil, 0, []Existing{have})
	if len(p.Steps) != 1 || p.Steps[0].Change != Update || p.Steps[0].Config.Mounts[0].Volume != "data_2" {
		t.Fatalf("plan: %+v", p.Steps)
	}
}
