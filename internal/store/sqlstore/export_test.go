package sqlstore

import (
	"context"
	"io/fs"

	"github.com/pressly/goose/v3"
)

// MigrateTo migrates db down to version, for tests of a migration's data.
func MigrateTo(ctx context.Context, db *DB, version int64) error {
	dir, dialect := "migrations/sqlite", goose.DialectSQLite3
	if db.pg {
		dir, dialect = "migrations/postgres", goose.DialectPostgres
	}
	sub, _ := fs.Sub(migrations, dir)
	p, err := goose.NewProvider(dialect, db.db, sub)
	if err != nil {
		return err
	}
	_, err = p.DownTo(ctx, version)
	return err
}
