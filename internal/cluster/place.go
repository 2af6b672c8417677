package cluster

import (
	"context"

	"github.com/kilnhq/kiln/internal/capacity"
)

// Place picks the live, uncordoned host with the most room for a new machine of size.
// It reads the hosts' usage as the store keeps it (one row per host), never the machines
// themselves; the hosts' offers come from the registry as read at most a heartbeat ago.
func (c *Cluster) Place(ctx context.Context, size capacity.Size) (string, error) {
	all, err := c.recentHosts(ctx)
	if err != nil {
		return "", err
	}
	hs := c.live(all)
	usage, err := c.cfg.Store.HostUsage(ctx)
	if err != nil {
		return "", err
	}
	hosts := make([]capacity.Host, len(hs))
	for i, h := range hs {
		hosts[i] = Offer(h)
	}
	return capacity.Place(hosts, usage, capacity.Request{Size: size})
}

// HostState is a host as `kiln host ls` shows it.
type HostState struct {
	capacity.Host
	// State is up, cordoned or down.
	State string
	Used  capacity.Size
}

// States lists every host with what it offers and holds. This host's use comes from its
// ledger (builders included); other hosts' from the usage the store keeps of their
// machines.
func (c *Cluster) States(ctx context.Context) ([]HostState, error) {
	used := map[string]capacity.Size{}
	if c.cfg.Ledger != nil {
		_, used = c.cfg.Ledger.Hosts()
	}
	rows, err := c.cfg.Store.ListHosts(ctx)
	if err != nil {
		return nil, err
	}
	usage, err := c.cfg.Store.HostUsage(ctx)
	if err != nil {
		return nil, err
	}
	now := c.cfg.Now()
	out := []HostState{}
	for _, h := range rows {
		st := HostState{Host: Offer(h), State: "up", Used: used[h.Name]}
		if h.Name != c.cfg.Here.Name {
			st.Used = capacity.Size(usage[h.Name])
		}
		if h.Cordoned {
			st.State = "cordoned"
		}
		if !Live(h, now) {
			st.State = "down"
		}
		out = append(out, st)
	}
	return out, nil
}
