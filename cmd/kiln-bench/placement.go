package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/machine"
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
	type rec struct {
		host string
		size capacity.Size
	}
	machines := make([]rec, nMachines)
	for i := range machines {
		machines[i] = rec{host: hosts[i%nHosts].Name, size: capacity.Size{CPUs: 1 + i%4, MemoryMiB: 256 << (i % 4)}}
	}
	n := 0
	start := time.Now()
	for time.Since(start) < 2*time.Second {
		used := map[string]capacity.Size{}
		for _, m := range machines {
			u := used[m.host]
			u.CPUs += m.size.CPUs
			u.MemoryMiB += m.size.MemoryMiB
			used[m.host] = u
		}
		if _, err := capacity.Place(hosts, used, capacity.Request{Size: capacity.Size{CPUs: 2, MemoryMiB: 1024}}); err != nil {
			return err
		}
		n++
	}
	add("placement_decisions", float64(n)/time.Since(start).Seconds(), "/s", fmt.Sprintf("%d hosts, usage summed from %d machine records each time", nHosts, nMachines))

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
