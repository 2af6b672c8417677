package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/node"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/testutil"
)

// benchPlacement times placement decisions over 100 hosts holding 10 000 machines, and
// recording a new machine in SQLite and in PostgreSQL.
func benchPlacement(ctx context.Context, work string, add func(string, float64, string, string)) error {
	const nHosts, nMachines = 100, 10000
	hosts := make([]capacity.Host, nHosts)
	for i := range hosts {
		hosts[i] = capacity.Host{Name: fmt.Sprintf("h%03d", i), CPUs: 64, MemoryMiB: 256 << 10, CPURatio: 4, MemRatio: 1.5, ReserveMemoryMiB: 4096}
	}
	// 10 000 started machines in a SQLite store, spread over the hosts.
	db, err := sqlstore.Open(ctx, filepath.Join(work, "placement-many.db"))
	if err != nil {
		return err
	}
	defer db.Close()
	db.CreateApp(ctx, "many")
	for i := 0; i < nMachines; i++ {
		id := fmt.Sprintf("p%05d", i)
		cfg := fmt.Sprintf(`{"image":"x","guest":{"cpus":%d,"memory_mb":%d}}`, 1+i%4, 256<<(i%4))
		if err := db.CreateMachine(ctx, store.Machine{ID: id, App: "many", Name: id, State: machine.Created, Config: []byte(cfg), Host: hosts[i%nHosts].Name},
			machine.Event{Type: "launch", Status: machine.Created, Source: "bench"}); err != nil {
			return err
		}
		db.Transition(ctx, id, machine.Created, machine.Starting, machine.Event{Type: "start", Source: "bench"})
		db.Transition(ctx, id, machine.Starting, machine.Started, machine.Event{Type: "start", Source: "bench"})
	}
	mgr := node.New(db, nil, nil, image.Cache{}, work, nil)
	defer mgr.Close()
	place := func(used map[string]capacity.Size) error {
		_, err := capacity.Place(hosts, used, capacity.Request{Size: capacity.Size{CPUs: 2, MemoryMiB: 1024}})
		return err
	}
	used, err := mgr.UsageByHost(ctx)
	if err != nil {
		return err
	}
	n := 0
	start := time.Now()
	for time.Since(start) < 2*time.Second {
		if err := place(used); err != nil {
			return err
		}
		n++
	}
	add("placement_decisions", float64(n)/time.Since(start).Seconds(), "/s", fmt.Sprintf("capacity.Place over %d hosts, usage of %d machines already summed", nHosts, nMachines))
	n = 0
	start = time.Now()
	for time.Since(start) < 3*time.Second {
		used, err := mgr.UsageByHost(ctx)
		if err != nil {
			return err
		}
		if err := place(used); err != nil {
			return err
		}
		n++
	}
	add("placement_decisions_from_store", float64(n)/time.Since(start).Seconds(), "/s", fmt.Sprintf("each decision reads the %d machines from SQLite first", nMachines))

	create := func(dsn string) (time.Duration, error) {
		db, err := sqlstore.Open(ctx, dsn)
		if err != nil {
			return 0, err
		}
		defer db.Close()
		db.CreateApp(ctx, "bench")
		var ds []time.Duration
		for i := 0; i < 200; i++ {
			t0 := time.Now()
			err := db.CreateMachine(ctx, store.Machine{ID: fmt.Sprintf("m%04d", i), App: "bench", Name: fmt.Sprintf("m%04d", i), State: machine.Created, Config: []byte(`{}`)},
				machine.Event{Type: "launch", Status: machine.Created, Source: "user"})
			if err != nil {
				return 0, err
			}
			ds = append(ds, time.Since(t0))
		}
		return pct(ds, 0.5), nil
	}
	lite, err := create(filepath.Join(work, "placement.db"))
	if err != nil {
		return err
	}
	add("machine_record_sqlite_p50", ms(lite), "ms", "record a machine and its first event (one transaction), 200 times")
	dsn, err := testutil.PostgresDB()
	if err != nil {
		fmt.Fprintf(os.Stderr, "kiln-bench: no PostgreSQL for the comparison: %v\n", err)
		return nil
	}
	defer testutil.StopPostgres()
	pg, err := create(dsn)
	if err != nil {
		return err
	}
	add("machine_record_postgres_p50", ms(pg), "ms", fmt.Sprintf("same on PostgreSQL over a Unix socket, a test server with fsync off (%.1fx SQLite)", float64(pg)/float64(lite)))
	return nil
}
