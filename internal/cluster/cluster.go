// Package cluster owns the hosts sharing a database: the one rule for whether a host is
// alive, this host's heartbeat, where a new machine goes (on usage the store keeps up to
// date), which host a call about a machine goes to, draining a host and claiming the
// machines other hosts placed here. On a single host (SQLite) the same registry carries
// the host's cordon, and every machine is this host's.
//
// The server assembly (internal/daemon) makes one Cluster; the API, the machine service
// and the build queue ask it, instead of reading the host table themselves.
package cluster

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"sync"
	"time"

	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

// DownAfter is how long a host may go without a heartbeat before it counts as down: its
// machines are not reached, it takes no new machines, and its builds are taken over.
const DownAfter = 10 * time.Second

// HeartbeatEvery is how often a host says it is alive: several beats fit in DownAfter,
// so a slow database answer does not make a host look dead.
const HeartbeatEvery = 2 * time.Second

// MaxClockSkew is how far a host's clock may be from the database's when it joins:
// heartbeats and leases compare clocks across hosts, and one far off would look dead, or
// never die.
const MaxClockSkew = 2 * time.Second

// Live says whether a host's last heartbeat is recent, at now. It is the one liveness
// rule: everything that asks whether a host is alive asks it.
func Live(h store.Host, now time.Time) bool { return now.Sub(h.HeartbeatAt) <= DownAfter }

// Offer is what a host's record offers, as the capacity model counts it: the one
// conversion between the two.
func Offer(h store.Host) capacity.Host {
	return capacity.Host{Name: h.Name, CPUs: h.CPUs, MemoryMiB: h.MemoryMiB, CPURatio: h.CPURatio, MemRatio: h.MemRatio,
		ReserveCPUs: h.ReserveCPUs, ReserveMemoryMiB: h.ReserveMemoryMiB, Cordoned: h.Cordoned}
}

// record is the registry's row for a host offering h at apiURL, alive at now.
func record(h capacity.Host, apiURL string, now time.Time) store.Host {
	return store.Host{Name: h.Name, APIURL: apiURL, CPUs: h.CPUs, MemoryMiB: h.MemoryMiB, CPURatio: h.CPURatio, MemRatio: h.MemRatio,
		ReserveCPUs: h.ReserveCPUs, ReserveMemoryMiB: h.ReserveMemoryMiB, Cordoned: h.Cordoned, HeartbeatAt: now}
}

// Store is what the cluster keeps in the shared database.
type Store interface {
	store.Hosts
	Transition(ctx context.Context, id string, from, to machine.State, ev machine.Event) error
	Note(ctx context.Context, id string, ev machine.Event) error
	// ClockSkew is how far this host's clock is from the database's.
	ClockSkew(ctx context.Context) (time.Duration, error)
}

// Config makes a Cluster.
type Config struct {
	Store Store
	// Here is this host and what it offers.
	Here capacity.Host
	// APIURL is where users reach this host's API (and its registry).
	APIURL string
	// PeerURL is where other hosts reach the same API over the cluster's mutual TLS:
	// calls forwarded here, and image pulls from this host's registry.
	PeerURL string
	// Shared says other hosts may share the database (PostgreSQL): new machines are
	// placed across hosts, machines placed here are claimed, and calls about another
	// host's machine go there. Without it every machine stays on this host.
	Shared bool
	// Ledger is this host's capacity ledger: the heartbeat applies cordons set through
	// any host to it, and it counts what this host's builders hold too.
	Ledger *capacity.Ledger
	// Net, if set, lets go of a drained machine's device on this host.
	Net Network
	Log io.Writer
	// Now is the clock; nil is time.Now (tests set it).
	Now func() time.Time
}

// Cluster is this host's view of the hosts sharing its database.
type Cluster struct {
	cfg Config

	// The registry as last read, for placement: hosts change far less often than the
	// usage read for every decision. Each heartbeat reads it again; a cordon made here
	// drops it.
	mu      sync.Mutex
	known   []store.Host
	knownAt time.Time
}

// New returns a cluster; Join registers this host in it.
func New(cfg Config) *Cluster {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Cluster{cfg: cfg}
}

// Name is this host's name.
func (c *Cluster) Name() string { return c.cfg.Here.Name }

// Shared says whether several hosts may share the database.
func (c *Cluster) Shared() bool { return c.cfg.Shared }

// Mine says whether this host runs the machine.
func (c *Cluster) Mine(m store.Machine) bool { return m.RunsOn(c.cfg.Here.Name) }

// HomeHost is the host a machine created here belongs to before placement: this one
// where hosts share the database, "" where only one host uses it.
func (c *Cluster) HomeHost() string {
	if !c.cfg.Shared {
		return ""
	}
	return c.cfg.Here.Name
}

func (c *Cluster) logf(format string, args ...any) {
	if c.cfg.Log != nil {
		fmt.Fprintf(c.cfg.Log, "kiln: "+format+"\n", args...)
	}
}

// Join checks this host's clock against the database's and registers the host (again)
// with what it offers; its cordon stays as it was.
func (c *Cluster) Join(ctx context.Context) error {
	skew, err := c.cfg.Store.ClockSkew(ctx)
	if err != nil {
		return fmt.Errorf("reading the database's clock: %w", err)
	}
	if skew > MaxClockSkew || skew < -MaxClockSkew {
		return errdefs.Invalid("this host's clock is %s off the database's (more than %s): fix its time (NTP) before it joins", skew.Round(time.Millisecond), MaxClockSkew)
	}
	rec := record(c.cfg.Here, c.cfg.APIURL, c.cfg.Now())
	rec.PeerURL = c.cfg.PeerURL
	if err := c.cfg.Store.RegisterHost(ctx, rec); err != nil {
		return fmt.Errorf("registering host %s: %w", c.cfg.Here.Name, err)
	}
	return nil
}

// Heartbeat tells the database this host is alive every HeartbeatEvery, and applies a
// cordon set through any host, until ctx ends. While the database is unreachable it says
// so once, and again when it is back; machines keep running meanwhile.
func (c *Cluster) Heartbeat(ctx context.Context) {
	t := time.NewTicker(HeartbeatEvery)
	defer t.Stop()
	down := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := c.beat(ctx)
		if err != nil {
			if !down && ctx.Err() == nil {
				c.logf("the database does not answer (%v); running machines go on, and changes wait for it", err)
			}
			down = true
			continue
		}
		if down {
			c.logf("the database answers again")
			down = false
		}
	}
}

// beat is one heartbeat: the host's own, then its cordon as the registry has it.
func (c *Cluster) beat(ctx context.Context) error {
	name := c.cfg.Here.Name
	if err := c.cfg.Store.Heartbeat(ctx, name, c.cfg.Now()); err != nil {
		return err
	}
	hosts, err := c.Hosts(ctx)
	if err != nil {
		return err
	}
	for _, h := range hosts {
		if h.Name != name || c.cfg.Ledger == nil || c.cfg.Ledger.Cordoned(name) == h.Cordoned {
			continue
		}
		c.cfg.Ledger.SetCordoned(name, h.Cordoned)
		if h.Cordoned {
			c.logf("host %s is cordoned: it takes no new machines or builders", name)
		} else {
			c.logf("host %s is uncordoned: it takes new work again", name)
		}
	}
	return nil
}

// Hosts lists every registered host, live or not.
func (c *Cluster) Hosts(ctx context.Context) ([]store.Host, error) {
	hs, err := c.cfg.Store.ListHosts(ctx)
	if err == nil {
		c.mu.Lock()
		c.known, c.knownAt = hs, time.Now()
		c.mu.Unlock()
	}
	return hs, err
}

// recentHosts is the registry as read within the last HeartbeatEvery: a host's
// heartbeat then looks at most that much older than it is, well within DownAfter, and a
// cordon set through another host counts here after as long as it takes that host to
// apply it itself.
func (c *Cluster) recentHosts(ctx context.Context) ([]store.Host, error) {
	c.mu.Lock()
	hs, at := c.known, c.knownAt
	c.mu.Unlock()
	if !at.IsZero() && time.Since(at) < HeartbeatEvery {
		return hs, nil
	}
	return c.Hosts(ctx)
}

// LiveHosts lists the hosts whose heartbeat is recent.
func (c *Cluster) LiveHosts(ctx context.Context) ([]store.Host, error) {
	hs, err := c.Hosts(ctx)
	if err != nil {
		return nil, err
	}
	return c.live(hs), nil
}

func (c *Cluster) live(hs []store.Host) []store.Host {
	now := c.cfg.Now()
	var out []store.Host
	for _, h := range hs {
		if Live(h, now) {
			out = append(out, h)
		}
	}
	return out
}

// PeerRegistries lists the other live hosts' registries as their peer listeners serve
// them (host:port, over the cluster's mutual TLS). A host that registered no peer
// listener (one not restarted since kiln had them) is left out.
func (c *Cluster) PeerRegistries(ctx context.Context) []string {
	hs, _ := c.LiveHosts(ctx)
	var out []string
	for _, h := range hs {
		if h.Name == c.cfg.Here.Name {
			continue
		}
		if u, err := url.Parse(h.PeerURL); err == nil && u.Host != "" {
			out = append(out, u.Host)
		}
	}
	return out
}

// Owner returns the record of the host that runs what (a machine, a build, the host
// itself), to send a call about it there. A host that is not registered or is down is
// ErrUnavailable, saying which.
func (c *Cluster) Owner(ctx context.Context, host, what string) (store.Host, error) {
	hs, err := c.cfg.Store.ListHosts(ctx)
	if err != nil {
		return store.Host{}, err
	}
	for _, h := range hs {
		if h.Name != host {
			continue
		}
		if now := c.cfg.Now(); !Live(h, now) {
			return h, errdefs.New(errdefs.ErrUnavailable, "%s runs on host %s, which is down (last heartbeat %s ago); kiln does not move machines by itself",
				what, host, now.Sub(h.HeartbeatAt).Round(time.Second))
		}
		return h, nil
	}
	return store.Host{}, errdefs.New(errdefs.ErrUnavailable, "%s is on host %s, which is not registered", what, host)
}

// IsLive says whether the named host is registered and its heartbeat recent.
func (c *Cluster) IsLive(ctx context.Context, host string) bool {
	_, err := c.Owner(ctx, host, "host "+host)
	return err == nil
}

// SetCordoned cordons or uncordons a host. This host applies its own cordon at once;
// another applies it at its next heartbeat.
func (c *Cluster) SetCordoned(ctx context.Context, name string, cordoned bool) error {
	if err := c.cfg.Store.SetHostCordoned(ctx, name, cordoned); err != nil {
		return err
	}
	c.mu.Lock()
	c.knownAt = time.Time{}
	c.mu.Unlock()
	if name != c.cfg.Here.Name || c.cfg.Ledger == nil {
		return nil
	}
	return c.cfg.Ledger.SetCordoned(name, cordoned)
}
