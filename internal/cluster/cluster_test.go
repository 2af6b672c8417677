package cluster

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

var t0 = time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)

func offer(name string) capacity.Host {
	return capacity.Host{Name: name, CPUs: 8, MemoryMiB: 16 << 10, CPURatio: 1, MemRatio: 1}
}

// testCluster makes a SQLite store holding hosts (name → heartbeat age at t0) and a
// cluster for host "here" at t0.
func testCluster(t *testing.T, shared bool, hosts map[string]time.Duration) (*Cluster, *sqlstore.DB) {
	t.Helper()
	ctx := context.Background()
	db, err := sqlstore.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	for name, age := range hosts {
		h := record(offer(name), "http://"+name+":4280", t0.Add(-age))
		h.PeerURL = "https://" + name + ":4281"
		if err := db.RegisterHost(ctx, h); err != nil {
			t.Fatal(err)
		}
	}
	db.CreateApp(ctx, "web")
	c := New(Config{Store: db, Here: offer("here"), APIURL: "http://here:4280", PeerURL: "https://here:4281", Shared: shared,
		Ledger: capacity.NewLedger(offer("here")), Now: func() time.Time { return t0 }})
	return c, db
}

// machineOn records a machine of size cpus/mem on host in state.
func machineOn(t *testing.T, db *sqlstore.DB, id, host string, state machine.State, config string) {
	t.Helper()
	ctx := context.Background()
	app := "web"
	if strings.HasPrefix(id, "builder-") {
		app = "_builders"
		db.CreateApp(ctx, app)
	}
	if err := db.CreateMachine(ctx, store.Machine{ID: id, App: app, Name: id, State: machine.Created, Config: []byte(config), Host: host},
		machine.Event{Type: "launch", Source: "test"}); err != nil {
		t.Fatal(err)
	}
	path := map[machine.State][]machine.State{
		machine.Created:  nil,
		machine.Starting: {machine.Starting},
		machine.Started:  {machine.Starting, machine.Started},
		machine.Stopped:  {machine.Starting, machine.Started, machine.Stopping, machine.Stopped},
	}[state]
	from := machine.Created
	for _, to := range path {
		if err := db.Transition(ctx, id, from, to, machine.Event{Type: "test", Source: "test"}); err != nil {
			t.Fatal(err)
		}
		from = to
	}
}

func TestOneLivenessRule(t *testing.T) {
	ctx := context.Background()
	c, _ := testCluster(t, true, map[string]time.Duration{"here": 0, "late": DownAfter - time.Second, "gone": DownAfter + time.Second})
	live, err := c.LiveHosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, h := range live {
		names = append(names, h.Name)
	}
	if !slices.Equal(names, []string{"here", "late"}) {
		t.Fatalf("live hosts %v, want here and late", names)
	}
	if _, err := c.Owner(ctx, "late", "machine m"); err != nil {
		t.Fatalf("owner late: %v", err)
	}
	_, err = c.Owner(ctx, "gone", "machine m")
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "down (last heartbeat 11s ago)") {
		t.Fatalf("owner gone: %v", err)
	}
	if _, err := c.Owner(ctx, "nowhere", "machine m"); !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "not registered") {
		t.Fatalf("owner nowhere: %v", err)
	}
	if c.IsLive(ctx, "gone") || !c.IsLive(ctx, "late") {
		t.Fatal("IsLive disagrees with Owner")
	}
	if got := c.PeerRegistries(ctx); !slices.Equal(got, []string{"late:4281"}) {
		t.Fatalf("peer registries %v", got)
	}
	states, err := c.States(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range states {
		if want := map[string]string{"here": "up", "late": "up", "gone": "down"}[s.Name]; s.State != want {
			t.Errorf("host %s is %s, want %s", s.Name, s.State, want)
		}
	}
	// A down host with the most room takes nothing.
	if to, err := c.Place(ctx, capacity.Size{CPUs: 1, MemoryMiB: 512}); err != nil || to == "gone" {
		t.Fatalf("placed on %q (%v)", to, err)
	}
}

func TestPlaceCountsMachinesHoldingRoom(t *testing.T) {
	ctx := context.Background()
	c, db := testCluster(t, true, map[string]time.Duration{"here": 0, "other": 0})
	size := capacity.Size{CPUs: 2, MemoryMiB: 1024}
	// Equal room: the name breaks the tie.
	if to, _ := c.Place(ctx, size); to != "here" {
		t.Fatalf("empty cluster placed on %s, want here", to)
	}
	machineOn(t, db, "m1", "here", machine.Started, `{"guest":{"cpus":2,"memory_mb":4096}}`)
	machineOn(t, db, "m2", "other", machine.Stopped, `{"guest":{"cpus":2,"memory_mb":8192}}`) // holds nothing
	if to, _ := c.Place(ctx, size); to != "other" {
		t.Fatalf("placed on %s, want other: here runs 4 GiB", to)
	}
	machineOn(t, db, "m3", "other", machine.Starting, `{"guest":{"cpus":2,"memory_mb":8192}}`)
	if to, _ := c.Place(ctx, size); to != "here" {
		t.Fatalf("placed on %s, want here: other starts 8 GiB", to)
	}
	states, _ := c.States(ctx)
	for _, s := range states {
		if s.Name == "other" && s.Used != (capacity.Size{CPUs: 2, MemoryMiB: 8192}) {
			t.Fatalf("other uses %+v", s.Used)
		}
	}
	if err := c.SetCordoned(ctx, "here", true); err != nil {
		t.Fatal(err)
	}
	if to, _ := c.Place(ctx, size); to != "other" {
		t.Fatalf("placed on cordoned %s", to)
	}
	if !c.cfg.Ledger.Cordoned("here") {
		t.Fatal("this host's cordon did not reach its ledger")
	}
	if _, err := c.Place(ctx, capacity.Size{CPUs: 2, MemoryMiB: 64 << 10}); !errors.Is(err, errdefs.ErrCapacity) {
		t.Fatalf("a machine that fits nowhere: %v", err)
	}
}

func TestHeartbeatAppliesCordonSetElsewhere(t *testing.T) {
	ctx := context.Background()
	c, db := testCluster(t, true, map[string]time.Duration{"here": time.Hour})
	if err := db.SetHostCordoned(ctx, "here", true); err != nil {
		t.Fatal(err)
	}
	if err := c.beat(ctx); err != nil {
		t.Fatal(err)
	}
	if !c.cfg.Ledger.Cordoned("here") {
		t.Fatal("the heartbeat did not apply the cordon")
	}
	if !c.IsLive(ctx, "here") {
		t.Fatal("a host that just beat is not live")
	}
}

func TestJoinRegistersWhatTheHostOffers(t *testing.T) {
	ctx := context.Background()
	c, _ := testCluster(t, true, nil)
	if err := c.Join(ctx); err != nil {
		t.Fatal(err)
	}
	hs, err := c.Hosts(ctx)
	if err != nil || len(hs) != 1 {
		t.Fatalf("hosts %v (%v)", hs, err)
	}
	if Offer(hs[0]) != offer("here") || hs[0].APIURL != "http://here:4280" || hs[0].PeerURL != "https://here:4281" {
		t.Fatalf("registered %+v", hs[0])
	}
}

// fakeMachines stops machines by moving their records, as the supervisor would.
type fakeMachines struct {
	db      *sqlstore.DB
	stopped []string
}

func (f *fakeMachines) Stop(ctx context.Context, id string) error {
	f.stopped = append(f.stopped, id)
	if err := f.db.Transition(ctx, id, machine.Started, machine.Stopping, machine.Event{Type: "stop"}); err != nil {
		return err
	}
	return f.db.Transition(ctx, id, machine.Stopping, machine.Stopped, machine.Event{Type: "stop"})
}

// Start records the start of a machine another host now runs, as the service does.
func (f *fakeMachines) Start(ctx context.Context, id string) error {
	return f.db.Transition(ctx, id, machine.Stopped, machine.Starting, machine.Event{Type: "start", Source: "user"})
}

func (f *fakeMachines) Wait(ctx context.Context, id string, state machine.State, _ time.Duration) error {
	m, err := f.db.GetMachine(ctx, id)
	if err == nil && m.State != state {
		err = fmt.Errorf("machine %s is %s", id, m.State)
	}
	return err
}

type fakeNet struct{ detached []string }

func (n *fakeNet) Detach(_ context.Context, id string) error {
	n.detached = append(n.detached, id)
	return nil
}

func TestDrain(t *testing.T) {
	ctx := context.Background()
	c, db := testCluster(t, true, map[string]time.Duration{"here": 0, "other": 0, "gone": time.Minute})
	net := &fakeNet{}
	c.cfg.Net = net
	machineOn(t, db, "run", "here", machine.Started, `{"guest":{"cpus":1,"memory_mb":512}}`)
	machineOn(t, db, "idle", "here", machine.Stopped, `{"guest":{"cpus":1,"memory_mb":512}}`)
	machineOn(t, db, "data", "here", machine.Started, `{"guest":{"cpus":1,"memory_mb":512},"mounts":[{"volume":"v","path":"/data"}]}`)
	machineOn(t, db, "big", "here", machine.Stopped, `{"guest":{"cpus":1,"memory_mb":65536}}`)
	machineOn(t, db, "theirs", "other", machine.Started, `{"guest":{"cpus":1,"memory_mb":512}}`)
	machineOn(t, db, "builder-shop", "here", machine.Stopped, `{"guest":{"cpus":1,"memory_mb":512}}`)
	ms := &fakeMachines{db: db}
	rep, err := c.Drain(ctx, ms)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(rep.Moved) != "[{run other } {idle other }]" {
		t.Fatalf("moved %v", rep.Moved)
	}
	kept := map[string]string{}
	for _, k := range rep.Kept {
		kept[k.Machine] = k.Why
	}
	if !strings.Contains(kept["data"], "volumes") || !strings.Contains(kept["big"], "not enough memory") ||
		!strings.Contains(kept["builder-shop"], "cache") || len(kept) != 3 {
		t.Fatalf("kept %v", kept)
	}
	if !slices.Equal(ms.stopped, []string{"run"}) || !slices.Equal(net.detached, []string{"run", "idle"}) {
		t.Fatalf("stopped %v, detached %v", ms.stopped, net.detached)
	}
	// The running one starts on the other host (its claim), the stopped one stays stopped.
	for id, want := range map[string]machine.State{"run": machine.Starting, "idle": machine.Stopped} {
		m, _ := db.GetMachine(ctx, id)
		if m.Host != "other" || m.State != want {
			t.Fatalf("machine %s is %s on %s, want %s on other", id, m.State, m.Host, want)
		}
	}
	hs, _ := db.ListHosts(ctx)
	for _, h := range hs {
		if h.Cordoned != (h.Name == "here") {
			t.Fatalf("host %s cordoned=%v", h.Name, h.Cordoned)
		}
	}
}

func TestDrainAloneKeepsEverything(t *testing.T) {
	ctx := context.Background()
	c, db := testCluster(t, false, map[string]time.Duration{"here": 0})
	machineOn(t, db, "run", "", machine.Started, `{}`)
	rep, err := c.Drain(ctx, &fakeMachines{db: db})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Moved) != 0 || len(rep.Kept) != 1 || !strings.Contains(rep.Kept[0].Why, "no other host shares") {
		t.Fatalf("report %+v", rep)
	}
}

type fakeClaimer struct {
	mu      sync.Mutex
	claimed []string
}

func (f *fakeClaimer) Claim(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.claimed = append(f.claimed, id)
	return true
}

func TestClaimTakesMachinesPlacedHere(t *testing.T) {
	ctx := context.Background()
	c, db := testCluster(t, true, map[string]time.Duration{"here": 0, "other": 0})
	machineOn(t, db, "placed", "here", machine.Starting, `{}`)
	machineOn(t, db, "running", "here", machine.Started, `{}`)
	machineOn(t, db, "theirs", "other", machine.Starting, `{}`)
	cl := &fakeClaimer{}
	// Just placed: the host that started it may still launch it itself.
	c.cfg.Now = time.Now
	c.Claim(ctx, cl)
	if len(cl.claimed) != 0 {
		t.Fatalf("claimed %v within the grace", cl.claimed)
	}
	c.cfg.Now = func() time.Time { return time.Now().Add(claimGrace + time.Second) }
	c.Claim(ctx, cl)
	if !slices.Equal(cl.claimed, []string{"placed"}) {
		t.Fatalf("claimed %v, want placed", cl.claimed)
	}
}
