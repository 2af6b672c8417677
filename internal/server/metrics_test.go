package server_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/auth/authtest"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// metricsServer is a server on a real store with machines of apps a and b in several
// states, and a registry with its state collectors, as the daemon makes it.
func metricsServer(t *testing.T) (url string, chk *auth.Checker, op string) {
	ctx := context.Background()
	db, err := sqlstore.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	// Machines are made created; some are moved on to starting.
	states := map[string][]machine.State{"a": {machine.Created, machine.Created, machine.Starting}, "b": {machine.Starting}}
	for app, ss := range states {
		if err := db.CreateApp(ctx, app); err != nil {
			t.Fatal(err)
		}
		for i, st := range ss {
			id := app + string(rune('0'+i))
			if err := db.CreateMachine(ctx, store.Machine{ID: id, App: app, Name: id, State: machine.Created, Config: []byte(`{"image":"x"}`)}, machine.Event{Type: "launch", Source: "user"}); err != nil {
				t.Fatal(err)
			}
			if st != machine.Created {
				if err := db.Transition(ctx, id, machine.Created, st, machine.Event{Type: "start", Source: "user"}); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	ledger := capacity.NewLedger(capacity.Host{Name: "h1", CPUs: 4, MemoryMiB: 8192, CPURatio: 2, MemRatio: 1})
	reg := metrics.NewRegistry(metrics.MachineStates{Count: db.MachineCounts}, metrics.Capacity{Ledger: ledger})
	ms := machines.New(machines.Config{Store: db, Dir: t.TempDir()})
	chk, op = authtest.Operator()
	srv := httptest.NewServer((&server.Server{Store: db, Node: ms, Auth: chk, Metrics: reg}).Handler())
	t.Cleanup(func() { srv.Close(); ms.Close() })
	return srv.URL, chk, op
}

func scrape(t *testing.T, url, token string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url+"/metrics", nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// The operator's scrape shows machines by state (read from the store when scraped), the
// host's capacity, and the store's latency, which the scrapes' own queries feed.
func TestMetricsShowMachinesByState(t *testing.T) {
	url, _, op := metricsServer(t)
	scrape(t, url, op) // its query is timed, and shows in the next scrape
	code, body := scrape(t, url, op)
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", code, body)
	}
	for _, want := range []string{
		`kiln_machines{app="a",state="created"} 2`,
		`kiln_machines{app="a",state="starting"} 1`,
		`kiln_machines{app="b",state="starting"} 1`,
		`kiln_host_cpus_offered{host="h1"} 8`,
		`kiln_host_memory_offered_bytes{host="h1"} 8.589934592e+09`,
		`kiln_host_cpu_overcommit_ratio{host="h1"} 2`,
		`kiln_store_query_seconds_count{operation="select machines"}`,
		`kiln_store_query_seconds_count{operation="insert machine_events"}`,
		`go_goroutines`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("the operator's scrape lacks %s", want)
		}
	}
}

// A token scoped to app a and project pa sees a's and pa's series only: none of b's or
// pb's, and nothing of the host, the store or the process. No token: 401.
func TestMetricsScopedToTheToken(t *testing.T) {
	url, chk, _ := metricsServer(t)
	metrics.BuildDuration.WithLabelValues("pa", "succeeded").Observe(3)
	metrics.BuildDuration.WithLabelValues("pb", "succeeded").Observe(3)
	metrics.MachineBoot.WithLabelValues("a").Observe(1)
	metrics.MachineBoot.WithLabelValues("b").Observe(1)
	tok := authtest.Issue(chk, "t-a", auth.ScopeCaveat(auth.App("a"), auth.Project("pa")), auth.RoleCaveat(auth.Read))
	code, body := scrape(t, url, tok)
	if code != http.StatusOK {
		t.Fatalf("GET /metrics with a's token: %d %s", code, body)
	}
	for _, want := range []string{`kiln_machines{app="a",state="created"} 2`, `kiln_build_duration_seconds_count{outcome="succeeded",project="pa"}`, `kiln_machine_boot_seconds_count{app="a"}`} {
		if !strings.Contains(body, want) {
			t.Errorf("a's scrape lacks %s:\n%s", want, body)
		}
	}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !strings.Contains(line, `app="a"`) && !strings.Contains(line, `project="pa"`) {
			t.Errorf("a's scrape shows a series that is not a's: %s", line)
		}
	}
	if code, _ := scrape(t, url, ""); code != http.StatusUnauthorized {
		t.Errorf("GET /metrics without a token: %d, want 401", code)
	}
}
