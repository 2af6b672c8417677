package cluster

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/cluster/clustertest"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/testutil"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testutil.StopPostgres()
	os.Exit(testutil.Finish(code))
}

// BenchmarkPlace times one placement decision read from the store, with 100 hosts and
// 10 000 running machines, on SQLite and on PostgreSQL.
func BenchmarkPlace(b *testing.B) {
	b.Run("sqlite", func(b *testing.B) { benchPlace(b, filepath.Join(b.TempDir(), "kiln.db")) })
	b.Run("postgres", func(b *testing.B) { benchPlace(b, testutil.Postgres(b)) })
}

func benchPlace(b *testing.B, dsn string) {
	ctx := context.Background()
	db, err := sqlstore.Open(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	if err := clustertest.Populate(ctx, db, 100, 10000); err != nil {
		b.Fatal(err)
	}
	c := New(Config{Store: db, Here: offer(clustertest.HostName(0)), Shared: true})
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Place(ctx, capacity.Size{CPUs: 2, MemoryMiB: 1024}); err != nil {
			b.Fatal(err)
		}
	}
}
