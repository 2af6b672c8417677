package sqlstore

import (
	"context"

	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/metrics"
)

// MachineCounts counts the machines of each app in each state, destroyed ones aside, in
// one query: a scrape of /metrics reads it, however many machines there are.
func (s *DB) MachineCounts(ctx context.Context) ([]metrics.MachineCount, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT app, state, count(*) FROM machines WHERE state <> ? GROUP BY app, state ORDER BY app, state`), machine.Destroyed)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []metrics.MachineCount
	for rows.Next() {
		var c metrics.MachineCount
		if err := rows.Scan(&c.App, &c.State, &c.Count); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}
