package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/cluster"
	"github.com/kilnhq/kiln/internal/cluster/clustertest"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/testutil"
)

// benchPlacement times placement decisions over 100 hosts holding 10 000 running
// machines, read from SQLite and from PostgreSQL as a server makes them, and recording a
// new machine in each.
func benchPlacement(ctx context.Context, work string, add func(string, float64, string, string)) error {
	const nHosts, nMachines = 100, 10000
	size := capacity.Size{CPUs: 2, MemoryMiB: 1024}
	lite, err := sqlstore.Open(ctx, filepath.Join(work, "placement-many.db"))
	if err != nil {
		return err
	}
	defer lite.Close()
	if err := clustertest.Populate(ctx, lite, nHosts, nMachines); err != nil {
		return err
	}
	// capacity.Place alone, on usage already in memory: the ceiling.
	hs, err := lite.ListHosts(ctx)
	if err != nil {
		return err
	}
	hosts := make([]capacity.Host, len(hs))
	for i, h := range hs {
		hosts[i] = cluster.Offer(h)
	}
	usage, err := lite.HostUsage(ctx)
	if err != nil {
		return err
	}
	used := map[string]capacity.Size{}
	for h, u := range usage {
		used[h] = capacity.Size(u)
	}
	rate, err := perSecond(2*time.Second, func() error {
		_, err := capacity.Place(hosts, used, capacity.Request{Size: size})
		return err
	})
	if err != nil {
		return err
	}
	add("placement_decisions", rate, "/s", fmt.Sprintf("capacity.Place over %d hosts, usage of %d machines already in memory", nHosts, nMachines))
	place := func(db *sqlstore.DB) (float64, error) {
		c := cluster.New(cluster.Config{Store: db, Here: hosts[0], Shared: true})
		return perSecond(3*time.Second, func() error { _, err := c.Place(ctx, size); return err })
	}
	if rate, err = place(lite); err != nil {
		return err
	}
	add("placement_decisions_sqlite", rate, "/s", fmt.Sprintf("cluster.Place: hosts' usage kept by the store (%d hosts, %d machines), read per decision", nHosts, nMachines))

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
	liteRec, err := create(filepath.Join(work, "placement.db"))
	if err != nil {
		return err
	}
	add("machine_record_sqlite_p50", ms(liteRec), "ms", "record a machine and its first event (one transaction), 200 times")
	dsn, err := testutil.PostgresDB()
	if err != nil {
		fmt.Fprintf(os.Stderr, "kiln-bench: no PostgreSQL for the comparison: %v\n", err)
		return nil
	}
	defer testutil.StopPostgres()
	pg, err := sqlstore.Open(ctx, dsn)
	if err != nil {
		return err
	}
	defer pg.Close()
	if err := clustertest.Populate(ctx, pg, nHosts, nMachines); err != nil {
		return err
	}
	if rate, err = place(pg); err != nil {
		return err
	}
	add("placement_decisions_postgres", rate, "/s", "same on PostgreSQL over a Unix socket")
	dsn, err = testutil.PostgresDB()
	if err != nil {
		return err
	}
	pgRec, err := create(dsn)
	if err != nil {
		return err
	}
	add("machine_record_postgres_p50", ms(pgRec), "ms", fmt.Sprintf("same on PostgreSQL over a Unix socket, a test server with fsync off (%.1fx SQLite)", float64(pgRec)/float64(liteRec)))
	return nil
}

// perSecond runs f for about d and says how many times a second it ran.
func perSecond(d time.Duration, f func() error) (float64, error) {
	n := 0
	start := time.Now()
	for time.Since(start) < d {
		if err := f(); err != nil {
			return 0, err
		}
		n++
	}
	return float64(n) / time.Since(start).Seconds(), nil
}
