package sqlstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/testutil"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testutil.StopPostgres()
	os.Exit(testutil.Finish(code))
}

// forEachDialect runs a test on SQLite and on a real PostgreSQL.
func forEachDialect(t *testing.T, test func(t *testing.T, dsn string)) {
	t.Run("sqlite", func(t *testing.T) { test(t, filepath.Join(t.TempDir(), "kiln.db")) })
	t.Run("postgres", func(t *testing.T) { test(t, testutil.Postgres(t)) })
}

func open(t *testing.T, path string) *sqlstore.DB {
	t.Helper()
	db, err := sqlstore.Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// createMachine records machine id of app web (made if need be), claiming the volumes.
func createMachine(db *sqlstore.DB, id string, volumes ...string) error {
	ctx := context.Background()
	db.CreateApp(ctx, "web")
	m := store.Machine{ID: id, App: "web", Name: id, State: machine.Created, Config: []byte(`{}`)}
	return db.CreateMachine(ctx, m, machine.Event{Type: "launch", Source: "user"}, volumes...)
}

func TestMachineLifecycle(t *testing.T) { forEachDialect(t, testMachineLifecycle) }

func testMachineLifecycle(t *testing.T, dsn string) {
	ctx := context.Background()
	path := dsn
	db := open(t, path)
	if err := db.CreateApp(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if err := db.CreateApp(ctx, "web"); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("duplicate app: %v", err)
	}
	m := store.Machine{ID: "m1", App: "web", Name: "a", State: machine.Created, Config: []byte(`{"image":"x"}`)}
	if err := db.CreateMachine(ctx, m, machine.Event{Type: "launch", Status: machine.Created, Source: "user"}); err != nil {
		t.Fatal(err)
	}
	if err := db.CreateMachine(ctx, store.Machine{ID: "m2", App: "nope", Name: "b", State: machine.Created, Config: []byte(`{}`)}, machine.Event{}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("machine in unknown app: %v", err)
	}
	step := func(from, to machine.State, typ string) {
		t.Helper()
		if err := db.Transition(ctx, "m1", from, to, machine.Event{Type: typ, Source: "kiln"}); err != nil {
			t.Fatalf("%s → %s: %v", from, to, err)
		}
	}
	step(machine.Created, machine.Starting, "start")
	step(machine.Starting, machine.Started, "start")
	// A transition the table forbids changes nothing.
	if err := db.Transition(ctx, "m1", machine.Started, machine.Created, machine.Event{}); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("started → created: %v", err)
	}
	// A stale from-state changes nothing.
	if err := db.Transition(ctx, "m1", machine.Stopped, machine.Starting, machine.Event{}); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("stale from: %v", err)
	}
	code := 3
	if err := db.Transition(ctx, "m1", machine.Started, machine.Stopping, machine.Event{Type: "exit", Source: "kiln", ExitCode: &code}); err != nil {
		t.Fatal(err)
	}
	step(machine.Stopping, machine.Stopped, "stop")

	// Everything survives reopening the database, as after a crash.
	db.Close()
	db = open(t, path)
	got, err := db.GetMachine(ctx, "m1")
	if err != nil || got.State != machine.Stopped || got.ExitCode == nil || *got.ExitCode != 3 || string(got.Config) != `{"image":"x"}` {
		t.Errorf("after reopen: %+v %v", got, err)
	}
	evs, _ := db.Events(ctx, "m1")
	var seq []string
	for _, e := range evs {
		seq = append(seq, fmt.Sprintf("%s:%s", e.Type, e.Status))
	}
	if want := "[launch:created start:starting start:started exit:stopping stop:stopped]"; fmt.Sprint(seq) != want {
		t.Errorf("events %v, want %s", seq, want)
	}
	ms, err := db.ListMachines(ctx, "web")
	if err != nil || len(ms) != 1 {
		t.Errorf("list: %v %v", ms, err)
	}
	if _, err := db.ListMachines(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("list unknown app: %v", err)
	}
	if _, err := db.GetMachine(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("get unknown: %v", err)
	}
}

// Of many concurrent attempts at the same transition exactly one wins, and exactly one
// event is written.
func TestTransitionIsCompareAndSwap(t *testing.T) { forEachDialect(t, testTransitionIsCompareAndSwap) }

func testTransitionIsCompareAndSwap(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	db.CreateApp(ctx, "web")
	db.CreateMachine(ctx, store.Machine{ID: "m1", App: "web", Name: "a", State: machine.Created, Config: []byte(`{}`)}, machine.Event{Type: "launch", Source: "user"})
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := 0
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := db.Transition(ctx, "m1", machine.Created, machine.Starting, machine.Event{Type: "start", Source: "user"})
			if err == nil {
				mu.Lock()
				wins++
				mu.Unlock()
			} else if !errors.Is(err, errdefs.ErrConflict) {
				t.Errorf("unexpected error: %v", err)
			}
		}()
	}
	wg.Wait()
	evs, _ := db.Events(ctx, "m1")
	if wins != 1 || len(evs) != 2 {
		t.Errorf("%d winners, %d events; want 1 and 2", wins, len(evs))
	}
}

func TestVolumes(t *testing.T) { forEachDialect(t, testVolumes) }

func testVolumes(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	db.CreateApp(ctx, "web")
	if err := db.CreateVolume(ctx, store.Volume{ID: "vol1", App: "web", Name: "data", SizeBytes: 1 << 30, Path: "/v/vol1.ext4"}); err != nil {
		t.Fatal(err)
	}
	if err := db.CreateVolume(ctx, store.Volume{ID: "vol2", App: "web", Name: "data"}); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("duplicate name: %v", err)
	}
	v, err := db.GetVolume(ctx, "web", "data")
	if err != nil || v.ID != "vol1" {
		t.Fatalf("by name: %+v %v", v, err)
	}
	for _, id := range []string{"m1", "m2"} {
		if err := createMachine(db, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.AttachVolume(ctx, "vol1", "m1"); err != nil {
		t.Fatal(err)
	}
	if err := db.AttachVolume(ctx, "vol1", "m2"); !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "m1") {
		t.Errorf("second attach: %v", err)
	}
	if err := db.DeleteVolume(ctx, "vol1"); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("delete attached: %v", err)
	}
	db.AttachVolume(ctx, "vol1", "")
	if err := db.AttachVolume(ctx, "vol1", "m2"); err != nil {
		t.Errorf("attach after detach: %v", err)
	}
	db.AttachVolume(ctx, "vol1", "")
	if err := db.DeleteVolume(ctx, "vol1"); err != nil {
		t.Fatal(err)
	}
	if _, err := db.GetVolume(ctx, "web", "data"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("after delete: %v", err)
	}
}

func TestBuilds(t *testing.T) { forEachDialect(t, testBuilds) }

func testBuilds(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	now := time.Now()
	for i, id := range []string{"b1", "b2"} {
		b := store.Build{ID: id, Project: "shop", Branch: "main", State: "queued", Spec: []byte(`{}`),
			NotBefore: now, CreatedAt: now.Add(time.Duration(i) * time.Second), UpdatedAt: now}
		if err := db.CreateBuild(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	if bs, err := db.ListBuilds(ctx, "shop"); err != nil || len(bs) != 2 || bs[0].ID != "b2" {
		t.Fatalf("list, newest first: %+v %v", bs, err)
	}
	if q, err := db.BuildsInState(ctx, "queued", "running"); err != nil || len(q) != 2 || q[0].ID != "b1" {
		t.Fatalf("queue, oldest first: %+v %v", q, err)
	}
	b, _ := db.GetBuild(ctx, "b1")
	from := b.Rev()
	b.State, b.Attempt, b.Result = "running", 1, []byte(`{"error":"x"}`)
	if err := db.UpdateBuild(ctx, b, from); err != nil {
		t.Fatal(err)
	}
	if err := db.UpdateBuild(ctx, b, from); !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("a second swap from queued: %v", err)
	}
	got, _ := db.GetBuild(ctx, "b1")
	if got.State != "running" || got.Attempt != 1 || string(got.Result) != `{"error":"x"}` {
		t.Fatalf("after update: %+v", got)
	}
	if _, err := db.GetBuild(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("unknown build: %v", err)
	}
}

func TestHosts(t *testing.T) { forEachDialect(t, testHosts) }

func testHosts(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	now := time.Now()
	h := store.Host{Name: "h1", APIURL: "http://10.0.0.1:4280", CPUs: 8, MemoryMiB: 32768, CPURatio: 4, MemRatio: 1.5, ReserveMemoryMiB: 1024, HeartbeatAt: now}
	if err := db.RegisterHost(ctx, h); err != nil {
		t.Fatal(err)
	}
	if err := db.SetHostCordoned(ctx, "h1", true); err != nil {
		t.Fatal(err)
	}
	h.CPUs = 16 // rejoins with more CPUs: the cordon stays
	if err := db.RegisterHost(ctx, h); err != nil {
		t.Fatal(err)
	}
	if err := db.Heartbeat(ctx, "h1", now.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	hs, err := db.ListHosts(ctx)
	if err != nil || len(hs) != 1 || hs[0].CPUs != 16 || !hs[0].Cordoned || hs[0].MemRatio != 1.5 || hs[0].HeartbeatAt.Sub(now) < 900*time.Millisecond {
		t.Fatalf("hosts: %+v %v", hs, err)
	}
	if err := db.Heartbeat(ctx, "nope", now); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("heartbeat of an unknown host: %v", err)
	}
	a, _ := db.Setting(ctx, "admin_token", "first")
	b, _ := db.Setting(ctx, "admin_token", "second")
	if a != "first" || b != "first" {
		t.Fatalf("the first host's setting must win: %q %q", a, b)
	}
}

func TestClockSkew(t *testing.T) { forEachDialect(t, testClockSkew) }

func testClockSkew(t *testing.T, dsn string) {
	skew, err := open(t, dsn).ClockSkew(context.Background())
	if err != nil || skew > time.Second || skew < -time.Second {
		t.Fatalf("skew against a database on this machine: %s %v", skew, err)
	}
}

// A host cut off from the database's other users keeps running its attempt; meanwhile
// another host queues the build again and runs it as a new attempt. The first host's
// late result must not land on that attempt, whichever of state, attempt and host it
// differs in.
func TestStaleBuildAttemptIsRefused(t *testing.T) { forEachDialect(t, testStaleBuildAttemptIsRefused) }

func testStaleBuildAttemptIsRefused(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	now := time.Now()
	if err := db.CreateBuild(ctx, store.Build{ID: "b1", Project: "shop", State: "queued", Spec: []byte(`{}`), NotBefore: now, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
	// swap moves the stored build on, as the build service does.
	swap := func(state string, attempt int, host string) store.Build {
		t.Helper()
		cur, err := db.GetBuild(ctx, "b1")
		if err != nil {
			t.Fatal(err)
		}
		nb := cur
		nb.State, nb.Attempt, nb.Host = state, attempt, host
		if err := db.UpdateBuild(ctx, nb, cur.Rev()); err != nil {
			t.Fatalf("%s, attempt %d on %s: %v", state, attempt, host, err)
		}
		got, _ := db.GetBuild(ctx, "b1")
		return got
	}
	late := func(name string, stale store.Build) {
		t.Helper()
		res := stale
		res.State, res.Result = "succeeded", []byte(`{"image":"sha256:stale"}`)
		before, _ := db.GetBuild(ctx, "b1")
		if err := db.UpdateBuild(ctx, res, stale.Rev()); !errors.Is(err, errdefs.ErrConflict) {
			t.Errorf("%s: a late result of attempt %d on %s was accepted (%v) over attempt %d on %s", name, stale.Attempt, stale.Host, err, before.Attempt, before.Host)
		}
		after, _ := db.GetBuild(ctx, "b1")
		if after.State != before.State || after.Attempt != before.Attempt || after.Host != before.Host || string(after.Result) != string(before.Result) {
			t.Errorf("%s: a refused result changed the build: %+v, was %+v", name, after, before)
		}
	}

	onA := swap("running", 1, "a")
	swap("queued", 1, "a") // host b sees a's heartbeat stop and queues the build again
	onB := swap("running", 2, "b")
	late("another host took over", onA)

	// Same attempt number, other host: a record written by a host that counted alike.
	swap("queued", 2, "b")
	swap("running", 3, "a")
	late("same host and state, older attempt", onA)
	impostor := onB
	impostor.Attempt = 3
	late("same attempt, other host", impostor)

	// The attempt that holds the build finishes normally.
	cur, _ := db.GetBuild(ctx, "b1")
	done := cur
	done.State = "succeeded"
	if err := db.UpdateBuild(ctx, done, cur.Rev()); err != nil {
		t.Fatalf("the current attempt's result: %v", err)
	}
}

// Concurrent read-modify-write updates of one machine's config each either land or are
// told to retry: none is lost.
func TestConfigUpdatesAreNotLost(t *testing.T) { forEachDialect(t, testConfigUpdatesAreNotLost) }

func testConfigUpdatesAreNotLost(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	if err := createMachine(db, "m1"); err != nil {
		t.Fatal(err)
	}
	const writers = 8
	var wg sync.WaitGroup
	var mu sync.Mutex
	conflicts := 0
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				rec, err := db.GetMachine(ctx, "m1")
				if err != nil {
					t.Error(err)
					return
				}
				cfg := map[string]string{}
				json.Unmarshal(rec.Config, &cfg)
				cfg[fmt.Sprintf("w%d", i)] = "set"
				raw, _ := json.Marshal(cfg)
				err = db.UpdateConfig(ctx, "m1", rec.Version, raw)
				if err == nil {
					return
				}
				if !errors.Is(err, errdefs.ErrConflict) {
					t.Error(err)
					return
				}
				mu.Lock()
				conflicts++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	rec, _ := db.GetMachine(ctx, "m1")
	cfg := map[string]string{}
	json.Unmarshal(rec.Config, &cfg)
	if len(cfg) != writers || rec.Version != 1+writers {
		t.Errorf("after %d concurrent updates (%d told to retry): version %d, config %v; want version %d and every writer's key", writers, conflicts, rec.Version, cfg, 1+writers)
	}
	evs, _ := db.Events(ctx, "m1")
	if n := len(evs) - 1; n != writers {
		t.Errorf("%d update events, want %d", n, writers)
	}
	// An update from an old version is refused and says so.
	if err := db.UpdateConfig(ctx, "m1", 1, []byte(`{}`)); !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "version") {
		t.Errorf("update from a stale version: %v", err)
	}
	// A running machine's config does not change underneath it.
	db.Transition(ctx, "m1", machine.Created, machine.Starting, machine.Event{Type: "start"})
	if err := db.UpdateConfig(ctx, "m1", rec.Version, []byte(`{}`)); !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "starting") {
		t.Errorf("update while starting: %v", err)
	}
	if err := db.UpdateConfig(ctx, "nope", 1, []byte(`{}`)); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("update of an unknown machine: %v", err)
	}
}

// A volume is held only by a machine whose record exists: the record and its claims are
// made in one transaction, and a refused claim leaves no machine behind.
func TestVolumeClaimsNeedAMachine(t *testing.T) { forEachDialect(t, testVolumeClaimsNeedAMachine) }

func testVolumeClaimsNeedAMachine(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	db.CreateApp(ctx, "web")
	for _, id := range []string{"vol1", "vol2"} {
		if err := db.CreateVolume(ctx, store.Volume{ID: id, App: "web", Name: id, SizeBytes: 1 << 30, Path: "/v/" + id}); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.AttachVolume(ctx, "vol1", "ghost"); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("attach to a machine that does not exist: %v", err)
	}
	if err := createMachine(db, "m1", "vol1"); err != nil {
		t.Fatal(err)
	}
	if v, _ := db.GetVolume(ctx, "web", "vol1"); v.AttachedMachine != "m1" {
		t.Errorf("vol1 is held by %q, want m1", v.AttachedMachine)
	}
	// m2 asks for a free volume and a held one: it is not created, and takes neither.
	if err := createMachine(db, "m2", "vol2", "vol1"); !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "m1") {
		t.Errorf("a machine claiming a held volume: %v", err)
	}
	if _, err := db.GetMachine(ctx, "m2"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("the refused machine exists: %v", err)
	}
	if v, _ := db.GetVolume(ctx, "web", "vol2"); v.AttachedMachine != "" {
		t.Errorf("the refused machine holds vol2")
	}
	// A machine on its way out takes nothing new, and DetachVolumes frees what it held.
	db.Transition(ctx, "m1", machine.Created, machine.Destroying, machine.Event{Type: "destroy"})
	if err := db.AttachVolume(ctx, "vol2", "m1"); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("attach to a machine being destroyed: %v", err)
	}
	if err := db.DetachVolumes(ctx, "m1"); err != nil {
		t.Fatal(err)
	}
	if err := createMachine(db, "m3", "vol1"); err != nil {
		t.Errorf("vol1 after its machine let go: %v", err)
	}
}

// The SQLite file and its journals are the owner's alone, new or already there.
func TestSQLiteFileIsPrivate(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kiln.db")
	check := func(when string) {
		t.Helper()
		for _, p := range []string{path, path + "-wal", path + "-shm"} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatalf("%s: %v", when, err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("%s: %s has mode %v, want -rw-------", when, filepath.Base(p), fi.Mode().Perm())
			}
		}
	}
	db := open(t, path)
	db.CreateApp(context.Background(), "web") // a write, so that the journals exist
	check("a new database")
	db.Close()
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		os.Chmod(p, 0o644)
	}
	db = open(t, path)
	db.CreateApp(context.Background(), "api")
	check("a database made before kiln kept it private")
}

func TestVolumeSnapshotSettings(t *testing.T) { forEachDialect(t, testVolumeSnapshotSettings) }

// A volume made without a retention keeps its snapshots Fly's 5 days; the settings
// change, snapshots read with their volume's retention and their own creation time, and
// a deleted snapshot is gone from every list.
func testVolumeSnapshotSettings(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	db.CreateApp(ctx, "web")
	db.CreateApp(ctx, "api")
	if err := db.CreateVolume(ctx, store.Volume{ID: "vol1", App: "web", Name: "data", SizeBytes: 1 << 30, Path: "/v/vol1"}); err != nil {
		t.Fatal(err)
	}
	if err := db.CreateVolume(ctx, store.Volume{ID: "vol2", App: "api", Name: "data", SizeBytes: 2 << 30, Path: "/v/vol2",
		SnapshotRetention: 9, AutoBackup: true}); err != nil {
		t.Fatal(err)
	}
	if v, err := db.GetVolume(ctx, "web", "vol1"); err != nil || v.SnapshotRetention != 5 || v.AutoBackup {
		t.Errorf("default settings: %+v %v", v, err)
	}
	if v, err := db.GetVolume(ctx, "api", "data"); err != nil || v.SnapshotRetention != 9 || !v.AutoBackup {
		t.Errorf("given settings: %+v %v", v, err)
	}
	if err := db.SetVolumeSnapshots(ctx, "vol1", 2, true); err != nil {
		t.Fatal(err)
	}
	if v, _ := db.GetVolume(ctx, "web", "data"); v.SnapshotRetention != 2 || !v.AutoBackup {
		t.Errorf("after set: %+v", v)
	}
	if err := db.SetVolumeSnapshots(ctx, "nope", 2, true); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("set on no volume: %v", err)
	}
	if vs, err := db.AllVolumes(ctx); err != nil || len(vs) != 2 || vs[0].ID != "vol1" || vs[1].ID != "vol2" {
		t.Errorf("all volumes: %+v %v", vs, err)
	}

	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, sn := range []store.Snapshot{
		{ID: "vs_old", VolumeID: "vol1", Path: "/s/old", SizeBytes: 1 << 30, StoredBytes: 4096, CreatedAt: old},
		{ID: "vs_new", VolumeID: "vol1", Path: "/s/new", SizeBytes: 1 << 30},
		{ID: "vs_api", VolumeID: "vol2", Path: "/s/api", SizeBytes: 2 << 30},
	} {
		if err := db.AddSnapshot(ctx, sn); err != nil {
			t.Fatal(err)
		}
	}
	sns, err := db.Snapshots(ctx, "vol1")
	if err != nil || len(sns) != 2 || sns[0].ID != "vs_old" || !sns[0].CreatedAt.Equal(old) || sns[0].StoredBytes != 4096 ||
		sns[0].RetentionDays != 2 || time.Since(sns[1].CreatedAt) > time.Minute {
		t.Errorf("snapshots: %+v %v", sns, err)
	}
	if sn, err := db.Snapshot(ctx, "api", "vs_api"); err != nil || sn.RetentionDays != 9 || sn.SizeBytes != 2<<30 {
		t.Errorf("snapshot: %+v %v", sn, err)
	}
	if _, err := db.Snapshot(ctx, "web", "vs_api"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("another app's snapshot: %v", err)
	}
	if err := db.DeleteSnapshot(ctx, "vs_old"); err != nil {
		t.Fatal(err)
	}
	if err := db.DeleteSnapshot(ctx, "vs_old"); err != nil {
		t.Errorf("deleting a deleted snapshot: %v", err)
	}
	all, err := db.AllSnapshots(ctx)
	if err != nil || len(all) != 2 || all[0].ID != "vs_new" || all[1].ID != "vs_api" {
		t.Errorf("all snapshots: %+v %v", all, err)
	}
}

// Metadata updates are bounded in the transaction that makes them, so concurrent ones
// cannot pass the bound together, and a stale machine_version changes nothing. An app
// is deleted only without machines or volumes, and takes its destroyed machines' records.
func TestMetadataAndAppDelete(t *testing.T) { forEachDialect(t, testMetadataAndAppDelete) }

func testMetadataAndAppDelete(t *testing.T, path string) {
	ctx := context.Background()
	db := open(t, path)
	if err := createMachine(db, "m1"); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kv := map[string]string{}
			for k := range machine.MaxMetadataKeys/2 + 1 {
				kv[fmt.Sprintf("k%d-%d", i, k)] = "v"
			}
			db.UpdateMetadata(ctx, "m1", 0, kv)
		}()
	}
	wg.Wait()
	if md, _ := db.Metadata(ctx, "m1"); len(md) > machine.MaxMetadataKeys {
		t.Errorf("%d metadata keys after two concurrent updates, over %d", len(md), machine.MaxMetadataKeys)
	}
	md, _ := db.Metadata(ctx, "m1")
	if all, err := db.AppMetadata(ctx, "web"); err != nil || len(all) != 1 || !maps.Equal(all["m1"], md) {
		t.Errorf("AppMetadata: %v %v, want m1's %v", all, err, md)
	}
	if err := db.UpdateMetadata(ctx, "m1", 7, map[string]string{"x": "y"}); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("an update at a stale version: %v, want a conflict", err)
	}
	if err := db.DeleteApp(ctx, "web"); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("deleting an app with a machine: %v, want a conflict", err)
	}
	for _, step := range [][2]machine.State{{machine.Created, machine.Destroying}, {machine.Destroying, machine.Destroyed}} {
		if err := db.Transition(ctx, "m1", step[0], step[1], machine.Event{Type: "destroy", Source: "user"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.DeleteApp(ctx, "web"); err != nil {
		t.Fatalf("deleting an app whose machines are destroyed: %v", err)
	}
	if _, err := db.GetMachine(ctx, "m1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("the destroyed machine's record outlived its app: %v", err)
	}
	if err := db.DeleteApp(ctx, "web"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("deleting it again: %v, want not found", err)
	}
}
