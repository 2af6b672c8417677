package daemon

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/cluster"
	"github.com/kilnhq/kiln/internal/network"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// openNetwork opens machines' networks, with the git user held to their egress policy
// and the database closed to them.
func openNetwork(ctx context.Context, o Options, dataDir, dsn string, log io.Writer) (*network.Manager, error) {
	cfg, err := o.netConfig()
	if err != nil {
		return nil, err
	}
	// git for `kiln build --git` runs on the host, for callers: its uid is held to the
	// machines' egress policy. nobody is no uid of kiln's to write rules for.
	if cred, name := build.GitUser(); name == build.GitUserName {
		cfg.ConfineUIDs = []uint32{cred.Uid}
	} else if cred != nil {
		fmt.Fprintf(log, "kiln: warning: build --git fetches run as %s, outside the egress policy (they can reach private addresses): create the system user %s (scripts/setup.sh does)\n", name, build.GitUserName)
	}
	// The VMMs' users send nothing from the host's stack (a jailed Firecracker shares it).
	if uids, err := vmrun.ParseUIDRange(o.VMUIDs); err == nil {
		cfg.DenyUIDs = [2]uint32{uids.First, uids.First + uids.Count - 1}
	}
	nets, err := network.Open(filepath.Join(dataDir, "network"), cfg, log)
	if err != nil {
		return nil, err
	}
	blockDatabase(ctx, nets, dsn, log)
	return nets, nil
}

// blockDatabase keeps machines away from the database's host: it holds every app's
// state, and a machine has no business there.
func blockDatabase(ctx context.Context, nets *network.Manager, dsn string, log io.Writer) {
	if !sqlstore.IsPostgres(dsn) {
		return // a SQLite file on this host, whose addresses are closed anyway
	}
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return // Open parsed it already
	}
	hosts := []string{cfg.Host}
	for _, f := range cfg.Fallbacks {
		hosts = append(hosts, f.Host)
	}
	addrs, err := network.ResolveHosts(ctx, hosts)
	if err != nil {
		fmt.Fprintf(log, "kiln: machines' egress: %v; those database addresses are not blocked\n", err)
	}
	if err := nets.BlockHosts(ctx, "database", addrs); err != nil {
		fmt.Fprintf(log, "kiln: machines' egress: blocking the database: %v\n", err)
	}
}

// blockPeers keeps machines away from every host sharing the database (their APIs and
// registries), as hosts join, every few seconds.
func blockPeers(ctx context.Context, hosts *cluster.Cluster, nets *network.Manager, logf func(string, ...any)) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		if hs, err := hosts.Hosts(ctx); err == nil {
			var names []string
			for _, h := range hs {
				for _, hu := range []string{h.APIURL, h.PeerURL} {
					if u, err := url.Parse(hu); err == nil && u.Hostname() != "" {
						names = append(names, u.Hostname())
					}
				}
			}
			addrs, _ := network.ResolveHosts(ctx, names)
			if err := nets.BlockHosts(ctx, "peers", addrs); err != nil && ctx.Err() == nil {
				logf("machines' egress: blocking peer hosts: %v", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
