// Package clustertest fills a store with a cluster's hosts and machines, for the
// placement benchmarks (BenchmarkPlace and kiln-bench).
package clustertest

import (
	"context"
	"fmt"
	"time"

	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

// Store is what Populate writes to.
type Store interface {
	CreateApp(ctx context.Context, name string) error
	CreateMachine(ctx context.Context, m store.Machine, ev machine.Event, volumes ...string) error
	Transition(ctx context.Context, id string, from, to machine.State, ev machine.Event) error
	RegisterHost(ctx context.Context, h store.Host) error
}

// Populate registers hosts h000… (64 CPUs, 256 GiB, alive now) and records machines
// started on them in turn, of 1 to 4 vCPUs and 256 MiB to 2 GiB, in app "many".
func Populate(ctx context.Context, st Store, hosts, machines int) error {
	if err := st.CreateApp(ctx, "many"); err != nil {
		return err
	}
	for i := 0; i < machines; i++ {
		id := fmt.Sprintf("p%05d", i)
		cfg := fmt.Sprintf(`{"image":"x","guest":{"cpus":%d,"memory_mb":%d}}`, 1+i%4, 256<<(i%4))
		if err := st.CreateMachine(ctx, store.Machine{ID: id, App: "many", Name: id, State: machine.Created, Config: []byte(cfg), Host: HostName(i % hosts)},
			machine.Event{Type: "launch", Status: machine.Created, Source: "bench"}); err != nil {
			return err
		}
		for _, step := range [][2]machine.State{{machine.Created, machine.Starting}, {machine.Starting, machine.Started}} {
			if err := st.Transition(ctx, id, step[0], step[1], machine.Event{Type: "start", Source: "bench"}); err != nil {
				return err
			}
		}
	}
	// The hosts join last: filling the store takes longer than a host stays alive without
	// a heartbeat.
	for i := 0; i < hosts; i++ {
		h := store.Host{Name: HostName(i), APIURL: fmt.Sprintf("http://10.0.%d.%d:4280", i/250, i%250+1), CPUs: 64, MemoryMiB: 256 << 10,
			CPURatio: 4, MemRatio: 1.5, ReserveMemoryMiB: 4096, HeartbeatAt: time.Now()}
		if err := st.RegisterHost(ctx, h); err != nil {
			return err
		}
	}
	return nil
}

// HostName is the name of host i.
func HostName(i int) string { return fmt.Sprintf("h%03d", i) }
