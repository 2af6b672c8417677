package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"time"

	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// benchMetrics measures issue 16's figures: GET /metrics with 1000 machines in the store
// (the operator's scrape, everything in it), and the API's p50 without scrapes and with
// one every second, each over the same stretch of time.
func benchMetrics(ctx context.Context, work string, add func(string, float64, string, string)) error {
	db, err := sqlstore.Open(ctx, filepath.Join(work, "metrics.db"))
	if err != nil {
		return err
	}
	defer db.Close()
	states := []machine.State{machine.Created, machine.Starting}
	for a := 0; a < 10; a++ {
		app := fmt.Sprintf("app%d", a)
		if err := db.CreateApp(ctx, app); err != nil {
			return err
		}
		for i := 0; i < 100; i++ {
			id := fmt.Sprintf("%s-m%03d", app, i)
			rec := store.Machine{ID: id, App: app, Name: id, State: machine.Created,
				Config: []byte(`{"image":"localhost/bench:1","guest":{"cpus":1,"memory_mb":256}}`)}
			if err := db.CreateMachine(ctx, rec, machine.Event{Type: "launch", Source: "user"}); err != nil {
				return err
			}
			if st := states[i%len(states)]; st != machine.Created {
				if err := db.Transition(ctx, id, machine.Created, st, machine.Event{Type: "start", Source: "user"}); err != nil {
					return err
				}
			}
		}
	}
	mgr := machines.New(machines.Config{Store: db, Dir: filepath.Join(work, "metrics-machines")})
	defer mgr.Close()
	ledger := capacity.NewLedger(capacity.Host{Name: "bench", CPUs: 16, MemoryMiB: 65536, CPURatio: 4, MemRatio: 1})
	reg := metrics.NewRegistry(metrics.MachineStates{Count: db.MachineCounts}, metrics.Capacity{Ledger: ledger}, metrics.Instances{List: mgr.Usage})
	srv := httptest.NewServer((&server.Server{Store: db, Node: mgr, Auth: opAuth, Metrics: reg}).Handler())
	defer srv.Close()
	get := func(path string) (time.Duration, error) {
		req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+path, nil)
		req.Header.Set("Authorization", "Bearer "+opToken)
		t0 := time.Now()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("GET %s: %s", path, resp.Status)
		}
		return time.Since(t0), nil
	}

	var scrapes []time.Duration
	for i := 0; i < 50; i++ {
		d, err := get("/metrics")
		if err != nil {
			return err
		}
		scrapes = append(scrapes, d)
	}
	add("metrics_1000_machines_p50", ms(pct(scrapes, 0.5)), "ms", "GET /metrics, operator's token, 1000 machines in 10 apps, SQLite (target: at most 50 ms)")
	add("metrics_1000_machines_p95", ms(pct(scrapes, 0.95)), "ms", fmt.Sprintf("50 scrapes; max %.1f ms", ms(pct(scrapes, 1))))

	// The API under a steady load, for the same time with and without a scrape a second.
	calls := func(window time.Duration, scrapeEvery time.Duration) ([]time.Duration, int, error) {
		stop := make(chan struct{})
		var wg sync.WaitGroup
		n := 0
		if scrapeEvery > 0 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				t := time.NewTicker(scrapeEvery)
				defer t.Stop()
				for {
					select {
					case <-stop:
						return
					case <-t.C:
						if _, err := get("/metrics"); err == nil {
							n++
						}
					}
				}
			}()
		}
		var ds []time.Duration
		var err error
		for end := time.Now().Add(window); time.Now().Before(end); {
			var d time.Duration
			if d, err = get("/v1/apps/app3/machines/app3-m042"); err != nil {
				break
			}
			ds = append(ds, d)
		}
		close(stop)
		wg.Wait()
		return ds, n, err
	}
	quiet, _, err := calls(10*time.Second, 0)
	if err != nil {
		return err
	}
	busy, n, err := calls(10*time.Second, time.Second)
	if err != nil {
		return err
	}
	add("api_p50_no_scrape", us(pct(quiet, 0.5)), "µs", fmt.Sprintf("GET /v1/apps/{app}/machines/{id}, %d calls in 10 s; p99 %.2f ms", len(quiet), ms(pct(quiet, 0.99))))
	add("api_p50_scrape_1s", us(pct(busy, 0.5)), "µs", fmt.Sprintf("same, with GET /metrics every second (%d scrapes): %d calls; p99 %.2f ms", n, len(busy), ms(pct(busy, 0.99))))
	return nil
}
