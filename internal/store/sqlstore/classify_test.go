package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/testutil"
)

// Constraint violations are told apart by the drivers' error codes, on SQLite and on
// PostgreSQL; an error that only reads like one is not one.
func TestConstraintViolationsByCode(t *testing.T) {
	for _, c := range []struct{ name, dsn string }{{"sqlite", filepath.Join(t.TempDir(), "kiln.db")}, {"postgres", ""}} {
		t.Run(c.name, func(t *testing.T) {
			dsn := c.dsn
			if dsn == "" {
				dsn = testutil.Postgres(t)
			}
			ctx := context.Background()
			db, err := Open(ctx, dsn)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			exec := func(q string, args ...any) error {
				_, err := db.db.ExecContext(ctx, db.q(q), args...)
				return err
			}
			now := time.Now().UTC()
			machineRow := `INSERT INTO machines (id, app, name, state, config, created_at, updated_at) VALUES (?, ?, ?, 'created', '{}', ?, ?)`
			if err := exec(`INSERT INTO apps (name, created_at) VALUES (?, ?)`, "web", now); err != nil {
				t.Fatal(err)
			}
			if err := exec(machineRow, "m1", "web", "a", now, now); err != nil {
				t.Fatal(err)
			}
			for what, err := range map[string]error{
				"a second app of one name (primary key)": exec(`INSERT INTO apps (name, created_at) VALUES (?, ?)`, "web", now),
				"a second machine of one name in an app": exec(machineRow, "m2", "web", "a", now, now),
			} {
				if !isUnique(err) || isForeignKey(err) {
					t.Errorf("%s: %v: unique %t, foreign key %t", what, err, isUnique(err), isForeignKey(err))
				}
			}
			err = exec(machineRow, "m3", "nope", "b", now, now)
			if !isForeignKey(err) || isUnique(err) {
				t.Errorf("a machine of no app: %v: foreign key %t, unique %t", err, isForeignKey(err), isUnique(err))
			}
		})
	}
	for _, err := range []error{
		errors.New("UNIQUE constraint failed: apps.name"),
		errors.New("FOREIGN KEY constraint failed"),
		fmt.Errorf("volume v-23505 of machine m-23503: disk full"),
		nil,
	} {
		if isUnique(err) || isForeignKey(err) {
			t.Errorf("%v: classified by its text", err)
		}
	}
}
