package sqlstore_test

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// observations is how many statements of an operation the store latency histogram has
// seen.
func observations(op string) uint64 {
	var m dto.Metric
	metrics.StoreQuery.WithLabelValues(op).(prometheus.Metric).Write(&m)
	return m.GetHistogram().GetSampleCount()
}

// Every statement is timed, in a transaction or not, and so are commits; a store method
// added later is timed without knowing it.
func TestStoreLatencyIsObserved(t *testing.T) { forEachDialect(t, testStoreLatencyIsObserved) }

func testStoreLatencyIsObserved(t *testing.T, dsn string) {
	db := open(t, dsn)
	ops := []string{"insert apps", "insert machines", "insert machine_events", "commit", "select machines"}
	before := map[string]uint64{}
	for _, op := range ops {
		before[op] = observations(op)
	}
	if err := createMachine(db, "m1"); err != nil { // CreateApp, then a transaction
		t.Fatal(err)
	}
	if _, err := db.GetMachine(context.Background(), "m1"); err != nil {
		t.Fatal(err)
	}
	for _, op := range ops {
		if observations(op) <= before[op] {
			t.Errorf("no %q statement was timed", op)
		}
	}
}

// MachineCounts counts by app and state in one query, leaving destroyed machines out.
func TestMachineCounts(t *testing.T) { forEachDialect(t, testMachineCounts) }

func testMachineCounts(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	for _, id := range []string{"m1", "m2", "m3"} {
		if err := createMachine(db, id); err != nil {
			t.Fatal(err)
		}
	}
	for _, step := range [][2]machine.State{{machine.Created, machine.Destroying}, {machine.Destroying, machine.Destroyed}} {
		if err := db.Transition(ctx, "m3", step[0], step[1], machine.Event{Type: "destroy", Source: "user"}); err != nil {
			t.Fatal(err)
		}
	}
	got, err := db.MachineCounts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0] != (metrics.MachineCount{App: "web", State: "created", Count: 2}) {
		t.Errorf("MachineCounts: %+v, want web created 2", got)
	}
}

func TestOperation(t *testing.T) {
	for q, want := range map[string]string{
		"SELECT id, app FROM machines WHERE id = ?":                               "select machines",
		"select count(*) from apps where name = $1":                               "select apps",
		"SELECT * FROM (SELECT id FROM audit ORDER BY id DESC LIMIT ?) AS recent": "select audit",
		"INSERT INTO machine_events (machine_id) VALUES (?)":                      "insert machine_events",
		"UPDATE hosts SET heartbeat_at = ? WHERE name = ?":                        "update hosts",
		"DELETE FROM volumes WHERE id = ?":                                        "delete volumes",
		"SELECT CURRENT_TIMESTAMP":                                                "select",
		"CREATE TABLE x (y int)":                                                  "other",
	} {
		if got := sqlstore.Operation(q); got != want {
			t.Errorf("Operation(%q) = %q, want %q", q, got, want)
		}
	}
}
