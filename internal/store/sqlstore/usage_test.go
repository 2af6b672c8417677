package sqlstore_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand"
	"testing"

	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

func TestHostUsageIsKept(t *testing.T) { forEachDialect(t, testHostUsageIsKept) }

// testHostUsageIsKept makes a random sequence of creates, transitions (allowed or not),
// config updates and moves, and checks after each step that the usage the store keeps
// per host equals the sum over every machine holding room.
func testHostUsageIsKept(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	if err := db.CreateApp(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(11))
	hosts := []string{"", "a", "b", "c"}
	config := func() []byte {
		return fmt.Appendf(nil, `{"image":"x","guest":{"cpus":%d,"memory_mb":%d}}`, 1+rng.Intn(8), 256*(1+rng.Intn(16)))
	}
	var ids []string
	steps := 600
	if testing.Short() {
		steps = 200
	}
	for step := 0; step < steps; step++ {
		switch op := rng.Intn(10); {
		case op == 0 || len(ids) == 0:
			id := fmt.Sprintf("m%04d", step)
			m := store.Machine{ID: id, App: "web", Name: id, State: machine.Created, Config: config(), Host: hosts[rng.Intn(len(hosts))]}
			if err := db.CreateMachine(ctx, m, machine.Event{Type: "launch", Source: "test"}); err != nil {
				t.Fatal(err)
			}
			ids = append(ids, id)
		case op <= 6:
			// A transition from a state read now or a stale guess: refused ones must
			// change nothing.
			id := ids[rng.Intn(len(ids))]
			m, err := db.GetMachine(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			from := m.State
			if rng.Intn(5) == 0 {
				from = machine.States[rng.Intn(len(machine.States))]
			}
			to := machine.States[rng.Intn(len(machine.States))]
			db.Transition(ctx, id, from, to, machine.Event{Type: "test", Source: "test"})
		case op <= 8:
			id := ids[rng.Intn(len(ids))]
			m, err := db.GetMachine(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			db.UpdateConfig(ctx, id, m.Version, config()) // refused unless stopped, created or failed
		default:
			db.MoveMachine(ctx, ids[rng.Intn(len(ids))], hosts[rng.Intn(len(hosts))]) // refused unless stopped
		}
		checkUsage(t, db, step)
	}
	// The usage survives a reopen: it is in the database, not in memory.
	db.Close()
	checkUsage(t, open(t, dsn), steps)
}

// checkUsage compares the kept usage with the sum over every machine holding room.
func checkUsage(t *testing.T, db *sqlstore.DB, step int) {
	t.Helper()
	ctx := context.Background()
	ms, err := db.ListMachines(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]store.Usage{}
	for _, m := range ms {
		if !store.HoldsRoom(m.State) {
			continue
		}
		var cfg struct {
			Guest struct {
				CPUs     int `json:"cpus"`
				MemoryMB int `json:"memory_mb"`
			} `json:"guest"`
		}
		if err := json.Unmarshal(m.Config, &cfg); err != nil {
			t.Fatal(err)
		}
		u := want[m.Host]
		u.CPUs += cfg.Guest.CPUs
		u.MemoryMiB += cfg.Guest.MemoryMB
		want[m.Host] = u
	}
	got, err := db.HostUsage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after step %d: kept usage %v, summed %v", step, got, want)
	}
}

// TestHostUsageMigration checks that a database made before usage was kept gets it
// summed once when it is migrated.
func TestHostUsageMigration(t *testing.T) { forEachDialect(t, testHostUsageMigration) }

func testHostUsageMigration(t *testing.T, path string) {
	ctx := context.Background()
	db := open(t, path)
	db.CreateApp(ctx, "web")
	m := store.Machine{ID: "m1", App: "web", Name: "m1", State: machine.Created, Config: []byte(`{"guest":{"cpus":3,"memory_mb":768}}`), Host: "a"}
	if err := db.CreateMachine(ctx, m, machine.Event{Type: "launch"}); err != nil {
		t.Fatal(err)
	}
	if err := db.Transition(ctx, "m1", machine.Created, machine.Starting, machine.Event{Type: "start"}); err != nil {
		t.Fatal(err)
	}
	if err := sqlstore.MigrateTo(ctx, db, 9); err != nil { // before host usage
		t.Fatal(err)
	}
	db.Close()
	db = open(t, path) // migrates up again, summing what is running
	got, err := db.HostUsage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := (store.Usage{CPUs: 3, MemoryMiB: 768}); got["a"] != want {
		t.Fatalf("usage after migration %v, want a: %v", got, want)
	}
}
