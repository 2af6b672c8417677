// Package sqlstore is the store.Store on SQL: SQLite (modernc.org/sqlite: pure Go, so
// kiln stays one static binary) for one host, PostgreSQL (pgx) for many hosts sharing
// one database. Queries are written once with ? placeholders and rebound for
// PostgreSQL; each dialect has its own migrations, applied by goose at open.
package sqlstore

import (
	"context"
	"database/sql"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

//go:embed migrations/sqlite/*.sql migrations/postgres/*.sql
var migrations embed.FS

// DB is the SQL store.
type DB struct {
	db *sql.DB
	pg bool

	wakeMu sync.Mutex
	wake   chan struct{} // closed at the next commit of an event (EventsWritten)
}

var _ store.Store = (*DB)(nil)

// IsPostgres says whether a --db value names a PostgreSQL database rather than a file.
func IsPostgres(dsn string) bool {
	return strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://")
}

// Open opens (creating if needed) the database and migrates it to the newest schema:
// a PostgreSQL URL (postgres://...), or else the path of a SQLite file. SQLite write
// transactions take the lock at BEGIN, so concurrent writers wait for each other
// instead of failing.
func Open(ctx context.Context, dsn string) (*DB, error) {
	driver, dir, dialect, conn := "sqlite", "migrations/sqlite", goose.DialectSQLite3,
		"file:"+dsn+"?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)&_txlock=immediate"
	pg := IsPostgres(dsn)
	if pg {
		driver, dir, dialect, conn = "pgx", "migrations/postgres", goose.DialectPostgres, dsn
	} else if err := ownerOnly(dsn); err != nil {
		return nil, err
	}
	db, err := openTimed(driver, conn)
	if err != nil {
		return nil, err
	}
	if pg {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := db.PingContext(pctx)
		cancel()
		if err != nil {
			db.Close()
			return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "cannot reach the PostgreSQL database (is it running, and is the URL right?)")
		}
	}
	sub, _ := fs.Sub(migrations, dir)
	p, err := goose.NewProvider(dialect, db, sub)
	if err != nil {
		db.Close()
		return nil, err
	}
	if _, err := p.Up(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("migrating the database: %w", err)
	}
	return &DB{db: db, pg: pg}, nil
}

// ownerOnly makes a SQLite database file, and the journal files beside it, readable by
// its owner only: it holds every machine's config and environment, secrets among them,
// and build contexts. SQLite creates its -wal and -shm files with the database file's mode,
// so creating that one 0600 is enough for a new database; an existing one is tightened.
func ownerOnly(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("opening the database %s: %w", path, err)
	}
	f.Close()
	for _, p := range []string{path, path + "-wal", path + "-shm", path + "-journal"} {
		if err := os.Chmod(p, 0o600); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("making the database %s private: %w", p, err)
		}
	}
	return nil
}

// q rebinds a query's ? placeholders to PostgreSQL's $1, $2...
func (s *DB) q(query string) string {
	if !s.pg {
		return query
	}
	var b strings.Builder
	n := 0
	for _, r := range query {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// isForeignKey says whether err is a foreign-key violation in either dialect, by the
// drivers' error codes (never the message, whose text is the driver's to change).
func isForeignKey(err error) bool {
	return pgCode(err) == "23503" || sqliteCode(err) == sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY
}

// isUnique says whether err is a unique-constraint violation in either dialect; a
// primary key is one (SQLite gives it a code of its own).
func isUnique(err error) bool {
	c := sqliteCode(err)
	return pgCode(err) == "23505" || c == sqlite3.SQLITE_CONSTRAINT_UNIQUE || c == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY
}

// pgCode is a PostgreSQL error's SQLSTATE; "" for other errors.
func pgCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// sqliteCode is an SQLite error's extended result code (the driver turns extended codes
// on); 0 for other errors.
func sqliteCode(err error) int {
	var se *sqlite.Error
	if errors.As(err, &se) {
		return se.Code()
	}
	return 0
}

func (s *DB) Close() error { return s.db.Close() }

func (s *DB) CreateApp(ctx context.Context, name string) error {
	_, err := s.db.ExecContext(ctx, s.q(`INSERT INTO apps (name, created_at) VALUES (?, ?)`), name, time.Now().UTC())
	if err != nil && isUnique(err) {
		return errdefs.New(errdefs.ErrConflict, "app %s already exists", name)
	}
	return err
}

func (s *DB) ListApps(ctx context.Context) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT name FROM apps ORDER BY name`))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, rows.Err()
}

func (s *DB) DeleteApp(ctx context.Context, name string) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var machines, volumes int
	if err := tx.QueryRowContext(ctx, s.q(`SELECT count(*) FROM machines WHERE app = ? AND state <> 'destroyed'`), name).Scan(&machines); err != nil {
		return err
	}
	if err := tx.QueryRowContext(ctx, s.q(`SELECT count(*) FROM volumes WHERE app = ?`), name).Scan(&volumes); err != nil {
		return err
	}
	if machines > 0 || volumes > 0 {
		return errdefs.New(errdefs.ErrConflict, "app %s still has %d machines and %d volumes: destroy them first, or delete the app with force=true", name, machines, volumes)
	}
	// Only destroyed machines' records go; a machine made since the count above keeps
	// the app (its foreign key refuses the delete below).
	for _, q := range []string{
		`DELETE FROM machine_events WHERE machine_id IN (SELECT id FROM machines WHERE app = ? AND state = 'destroyed')`,
		`DELETE FROM machine_metadata WHERE machine_id IN (SELECT id FROM machines WHERE app = ? AND state = 'destroyed')`,
		`DELETE FROM machines WHERE app = ? AND state = 'destroyed'`,
		// The name can be taken again, by another tenant: the journal's history of this
		// app must not become theirs, nor its releases and secrets (their numbering
		// starts again from 1).
		`DELETE FROM events WHERE app = ?`,
		`DELETE FROM releases WHERE app = ?`,
		`DELETE FROM release_counters WHERE app = ?`,
		`DELETE FROM secrets WHERE app = ?`,
	} {
		if _, err := tx.ExecContext(ctx, s.q(q), name); err != nil {
			return fmt.Errorf("deleting app %s: %w", name, err)
		}
	}
	res, err := tx.ExecContext(ctx, s.q(`DELETE FROM apps WHERE name = ?`), name)
	if err != nil {
		return fmt.Errorf("deleting app %s: %w", name, err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return errdefs.New(errdefs.ErrNotFound, "app %s does not exist", name)
	}
	return tx.Commit()
}

func (s *DB) CreateMachine(ctx context.Context, m store.Machine, ev machine.Event, volumes ...string) error {
	if m.State != machine.Created {
		return errdefs.Invalid("a new machine starts in state created, not %s", m.State)
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	now := time.Now().UTC()
	size := sizeOf(m.Config)
	_, err = tx.ExecContext(ctx, s.q(`INSERT INTO machines (id, app, name, state, config, version, created_at, updated_at, host, cpus, memory_mib)
		VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?)`), m.ID, m.App, m.Name, m.State, string(m.Config), now, now, m.Host, size.CPUs, size.MemoryMiB)
	if err != nil {
		switch {
		case isUnique(err):
			return errdefs.New(errdefs.ErrConflict, "app %s already has a machine named %s", m.App, m.Name)
		case isForeignKey(err):
			return errdefs.New(errdefs.ErrNotFound, "app %s does not exist: create it first", m.App)
		}
		return err
	}
	for _, v := range volumes {
		if err := s.attachVolume(ctx, tx, v, m.ID); err != nil {
			return err
		}
	}
	ev.Status = m.State
	if err := s.appendEvent(ctx, tx, m.ID, m.App, m.Host, ev); err != nil {
		return err
	}
	return s.commit(tx)
}

// appendEvent appends ev to machine id's journal, and to the journal of everything, in
// tx: the transaction that makes the change ev describes.
func (s *DB) appendEvent(ctx context.Context, tx *sql.Tx, id, app, host string, ev machine.Event) error {
	if ev.Timestamp.IsZero() {
		ev.Timestamp = time.Now()
	}
	// A message can carry what a guest printed (a boot failure's console tail): one
	// PostgreSQL refuses must not refuse the change it describes.
	ev.Message = store.CleanText(ev.Message, store.MaxEventMessage)
	_, err := tx.ExecContext(ctx, s.q(`INSERT INTO machine_events (machine_id, type, status, source, ts, exit_code, message) VALUES (?, ?, ?, ?, ?, ?, ?)`),
		id, ev.Type, ev.Status, ev.Source, ev.Timestamp.UTC(), ev.ExitCode, ev.Message)
	if err != nil {
		return err
	}
	if e, ok := machineEvent(id, app, host, ev); ok {
		return s.appendJournal(ctx, tx, e)
	}
	return nil
}

const machineCols = `id, app, name, state, config, version, exit_code, restarts, created_at, updated_at, cordoned, host`

func scanMachine(row interface{ Scan(...any) error }) (store.Machine, error) {
	var m store.Machine
	var cfg string
	var exit sql.NullInt64
	err := row.Scan(&m.ID, &m.App, &m.Name, &m.State, &cfg, &m.Version, &exit, &m.Restarts, &m.CreatedAt, &m.UpdatedAt, &m.Cordoned, &m.Host)
	if exit.Valid {
		c := int(exit.Int64)
		m.ExitCode = &c
	}
	m.Config = []byte(cfg)
	return m, err
}

func (s *DB) GetMachine(ctx context.Context, id string) (store.Machine, error) {
	m, err := scanMachine(s.db.QueryRowContext(ctx, s.q(`SELECT `+machineCols+` FROM machines WHERE id = ?`), id))
	if errors.Is(err, sql.ErrNoRows) {
		return m, errdefs.New(errdefs.ErrNotFound, "machine %s does not exist", id)
	}
	return m, err
}

func (s *DB) ListMachines(ctx context.Context, app string) ([]store.Machine, error) {
	var n int
	if err := s.db.QueryRowContext(ctx, s.q(`SELECT count(*) FROM apps WHERE name = ?`), app).Scan(&n); err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, errdefs.New(errdefs.ErrNotFound, "app %s does not exist", app)
	}
	return s.queryMachines(ctx, `SELECT `+machineCols+` FROM machines WHERE app = ? ORDER BY created_at, id`, app)
}

func (s *DB) queryMachines(ctx context.Context, query string, args ...any) ([]store.Machine, error) {
	rows, err := s.db.QueryContext(ctx, s.q(query), args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.Machine
	for rows.Next() {
		m, err := scanMachine(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

func (s *DB) Transition(ctx context.Context, id string, from, to machine.State, ev machine.Event) error {
	if err := machine.CheckTransition(from, to); err != nil {
		return err
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var app, host string
	var size store.Usage
	err = tx.QueryRowContext(ctx, s.q(`UPDATE machines SET state = ?, updated_at = ?, exit_code = COALESCE(?, exit_code) WHERE id = ? AND state = ?
		RETURNING app, host, cpus, memory_mib`),
		to, time.Now().UTC(), ev.ExitCode, id, from).Scan(&app, &host, &size.CPUs, &size.MemoryMiB)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return err
	}
	if errors.Is(err, sql.ErrNoRows) {
		var cur machine.State
		err := tx.QueryRowContext(ctx, s.q(`SELECT state FROM machines WHERE id = ?`), id).Scan(&cur)
		if errors.Is(err, sql.ErrNoRows) {
			return errdefs.New(errdefs.ErrNotFound, "machine %s does not exist", id)
		}
		return errdefs.New(errdefs.ErrConflict, "machine %s is %s, not %s: it changed meanwhile", id, cur, from)
	}
	switch held, holds := store.HoldsRoom(from), store.HoldsRoom(to); {
	case !held && holds:
		err = s.addUsage(ctx, tx, host, size.CPUs, size.MemoryMiB)
	case held && !holds:
		err = s.addUsage(ctx, tx, host, -size.CPUs, -size.MemoryMiB)
	}
	if err != nil {
		return err
	}
	ev.Status = to
	if err := s.appendEvent(ctx, tx, id, app, host, ev); err != nil {
		return err
	}
	return s.commit(tx)
}

func (s *DB) Events(ctx context.Context, id string) ([]machine.Event, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT type, status, source, ts, exit_code, message FROM machine_events WHERE machine_id = ? ORDER BY seq`), id)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []machine.Event
	for rows.Next() {
		var e machine.Event
		var exit sql.NullInt64
		if err := rows.Scan(&e.Type, &e.Status, &e.Source, &e.Timestamp, &exit, &e.Message); err != nil {
			return nil, err
		}
		if exit.Valid {
			c := int(exit.Int64)
			e.ExitCode = &c
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

const volumeCols = `id, app, name, size_bytes, path, COALESCE(attached_machine, ''), created_at, snapshot_retention, auto_backup_enabled`

func scanVolume(row interface{ Scan(...any) error }) (store.Volume, error) {
	var v store.Volume
	err := row.Scan(&v.ID, &v.App, &v.Name, &v.SizeBytes, &v.Path, &v.AttachedMachine, &v.CreatedAt, &v.SnapshotRetention, &v.AutoBackup)
	return v, err
}

// CreateVolume records v; a zero SnapshotRetention is store.DefaultSnapshotRetention (the
// schema's default, 0, is for volumes made before retention existed).
func (s *DB) CreateVolume(ctx context.Context, v store.Volume) error {
	if v.SnapshotRetention <= 0 {
		v.SnapshotRetention = store.DefaultSnapshotRetention
	}
	_, err := s.db.ExecContext(ctx, s.q(`INSERT INTO volumes (id, app, name, size_bytes, path, created_at, auto_backup_enabled, snapshot_retention)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?)`), v.ID, v.App, v.Name, v.SizeBytes, v.Path, time.Now().UTC(), v.AutoBackup, v.SnapshotRetention)
	if err != nil {
		switch {
		case isUnique(err):
			return errdefs.New(errdefs.ErrConflict, "app %s already has a volume named %s", v.App, v.Name)
		case isForeignKey(err):
			return errdefs.New(errdefs.ErrNotFound, "app %s does not exist: create it first", v.App)
		}
	}
	return err
}

func (s *DB) GetVolume(ctx context.Context, app, idOrName string) (store.Volume, error) {
	v, err := scanVolume(s.db.QueryRowContext(ctx, s.q(`SELECT `+volumeCols+` FROM volumes WHERE app = ? AND (id = ? OR name = ?)`), app, idOrName, idOrName))
	if errors.Is(err, sql.ErrNoRows) {
		return v, errdefs.New(errdefs.ErrNotFound, "app %s has no volume %s: create it with `kiln volume create %s --app %s`", app, idOrName, idOrName, app)
	}
	return v, err
}

func (s *DB) ListVolumes(ctx context.Context, app string) ([]store.Volume, error) {
	return s.volumes(ctx, `WHERE app = ?`, app)
}

func (s *DB) AllVolumes(ctx context.Context) ([]store.Volume, error) {
	return s.volumes(ctx, ``)
}

func (s *DB) volumes(ctx context.Context, where string, args ...any) ([]store.Volume, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT `+volumeCols+` FROM volumes `+where+` ORDER BY created_at, id`), args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.Volume
	for rows.Next() {
		v, err := scanVolume(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

func (s *DB) AttachVolume(ctx context.Context, id, machineID string) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := s.attachVolume(ctx, tx, id, machineID); err != nil {
		return err
	}
	return tx.Commit()
}

// attachVolume is AttachVolume inside tx. A machine takes a volume only while its record
// exists and is not being destroyed: a claim by a machine that never came to be, or one
// on its way out, would hold the volume for ever.
func (s *DB) attachVolume(ctx context.Context, tx *sql.Tx, id, machineID string) error {
	var res sql.Result
	var err error
	if machineID == "" {
		res, err = tx.ExecContext(ctx, s.q(`UPDATE volumes SET attached_machine = NULL WHERE id = ?`), id)
	} else {
		res, err = tx.ExecContext(ctx, s.q(`UPDATE volumes SET attached_machine = ? WHERE id = ? AND (attached_machine IS NULL OR attached_machine = ?)
			AND EXISTS (SELECT 1 FROM machines WHERE id = ? AND state NOT IN (?, ?))`),
			machineID, id, machineID, machineID, machine.Destroying, machine.Destroyed)
	}
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 1 {
		return nil
	}
	var holder sql.NullString
	var name string
	if err := tx.QueryRowContext(ctx, s.q(`SELECT name, attached_machine FROM volumes WHERE id = ?`), id).Scan(&name, &holder); err != nil {
		return errdefs.New(errdefs.ErrNotFound, "volume %s does not exist", id)
	}
	if holder.Valid && holder.String != machineID {
		return errdefs.New(errdefs.ErrConflict, "volume %s is attached to machine %s: a volume attaches to one machine at a time; destroy that machine or use another volume", name, holder.String)
	}
	return errdefs.New(errdefs.ErrConflict, "volume %s cannot attach to machine %s: the machine does not exist or is being destroyed", name, machineID)
}

func (s *DB) DetachVolumes(ctx context.Context, machineID string) error {
	_, err := s.db.ExecContext(ctx, s.q(`UPDATE volumes SET attached_machine = NULL WHERE attached_machine = ?`), machineID)
	return err
}

func (s *DB) SetVolumeSize(ctx context.Context, id string, size int64) error {
	_, err := s.db.ExecContext(ctx, s.q(`UPDATE volumes SET size_bytes = ? WHERE id = ?`), size, id)
	return err
}

func (s *DB) SetVolumeSnapshots(ctx context.Context, id string, retentionDays int, autoBackup bool) error {
	res, err := s.db.ExecContext(ctx, s.q(`UPDATE volumes SET snapshot_retention = ?, auto_backup_enabled = ? WHERE id = ?`), retentionDays, autoBackup, id)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return errdefs.New(errdefs.ErrNotFound, "volume %s does not exist", id)
	}
	return nil
}

func (s *DB) DeleteVolume(ctx context.Context, id string) error {
	res, err := s.db.ExecContext(ctx, s.q(`DELETE FROM volumes WHERE id = ? AND attached_machine IS NULL`), id)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return errdefs.New(errdefs.ErrConflict, "volume %s is attached to a machine (or gone): destroy the machine first", id)
	}
	return nil
}

func (s *DB) UpdateConfig(ctx context.Context, id string, version int, config []byte) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	// One statement compares and swaps: on PostgreSQL a read followed by a write in a
	// read-committed transaction lets two updates both pass the read.
	// The states it may change in hold no room, so no host's usage changes with the size.
	var state machine.State
	var app, host string
	size := sizeOf(config)
	err = tx.QueryRowContext(ctx, s.q(`UPDATE machines SET config = ?, cpus = ?, memory_mib = ?, version = version + 1, updated_at = ?
		WHERE id = ? AND version = ? AND state IN (?, ?, ?) RETURNING state, app, host`),
		string(config), size.CPUs, size.MemoryMiB, time.Now().UTC(), id, version, machine.Stopped, machine.Created, machine.Failed).Scan(&state, &app, &host)
	if errors.Is(err, sql.ErrNoRows) {
		var cur int
		if err := tx.QueryRowContext(ctx, s.q(`SELECT state, version FROM machines WHERE id = ?`), id).Scan(&state, &cur); err != nil {
			return errdefs.New(errdefs.ErrNotFound, "machine %s does not exist", id)
		}
		if cur != version {
			return errdefs.New(errdefs.ErrConflict, "machine %s changed meanwhile (it is at version %d, this update was made from %d): read it again and retry", id, cur, version)
		}
		return errdefs.New(errdefs.ErrConflict, "machine %s is %s: its config changes only while stopped", id, state)
	}
	if err != nil {
		return err
	}
	if err := s.appendEvent(ctx, tx, id, app, host, machine.Event{Type: string(machine.EvUpdate), Status: state, Source: machine.SourceUser}); err != nil {
		return err
	}
	return s.commit(tx)
}

func (s *DB) SetCordoned(ctx context.Context, id string, cordoned bool) error {
	res, err := s.db.ExecContext(ctx, s.q(`UPDATE machines SET cordoned = ? WHERE id = ?`), cordoned, id)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return errdefs.New(errdefs.ErrNotFound, "machine %s does not exist", id)
	}
	return nil
}

func (s *DB) Lease(ctx context.Context, id string) (store.Lease, error) {
	var l store.Lease
	var exp sql.NullTime
	err := s.db.QueryRowContext(ctx, s.q(`SELECT lease_nonce, lease_expires, lease_description, lease_owner FROM machines WHERE id = ?`), id).Scan(&l.Nonce, &exp, &l.Description, &l.Owner)
	if errors.Is(err, sql.ErrNoRows) {
		return l, errdefs.New(errdefs.ErrNotFound, "machine %s does not exist", id)
	}
	if err != nil {
		return l, err
	}
	if l.Nonce == "" || !exp.Valid || time.Now().After(exp.Time) {
		return store.Lease{}, nil
	}
	l.ExpiresAt = exp.Time
	return l, nil
}

func (s *DB) SetLease(ctx context.Context, id, holder string, l store.Lease) error {
	now := time.Now().UTC()
	var exp any
	if !l.ExpiresAt.IsZero() {
		exp = l.ExpiresAt.UTC()
	}
	res, err := s.db.ExecContext(ctx, s.q(`UPDATE machines SET lease_nonce = ?, lease_expires = ?, lease_description = ?, lease_owner = ?
		WHERE id = ? AND (lease_nonce = '' OR lease_expires IS NULL OR lease_expires < ? OR lease_nonce = ?)`),
		l.Nonce, exp, l.Description, l.Owner, id, now, holder)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n != 1 {
		if _, err := s.GetMachine(ctx, id); err != nil {
			return err
		}
		return errdefs.New(errdefs.ErrConflict, "machine %s is leased by someone else: wait for the lease to expire or send its nonce in fly-machine-lease-nonce", id)
	}
	return nil
}

func (s *DB) Metadata(ctx context.Context, id string) (map[string]string, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT key, value FROM machine_metadata WHERE machine_id = ? ORDER BY key`), id)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var k, v string
		if err := rows.Scan(&k, &v); err != nil {
			return nil, err
		}
		out[k] = v
	}
	return out, rows.Err()
}

func (s *DB) AppMetadata(ctx context.Context, app string) (map[string]map[string]string, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT md.machine_id, md.key, md.value FROM machine_metadata md
		JOIN machines m ON m.id = md.machine_id WHERE m.app = ?`), app)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]map[string]string{}
	for rows.Next() {
		var id, k, v string
		if err := rows.Scan(&id, &k, &v); err != nil {
			return nil, err
		}
		if out[id] == nil {
			out[id] = map[string]string{}
		}
		out[id][k] = v
	}
	return out, rows.Err()
}

func (s *DB) SetMetadata(ctx context.Context, id, key, value string) error {
	return s.UpdateMetadata(ctx, id, 0, map[string]string{key: value})
}

func (s *DB) UpdateMetadata(ctx context.Context, id string, version int, kv map[string]string) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	// The machine's row is locked first (PostgreSQL; SQLite has one writer at a time), so
	// that two updates count each other's keys below.
	lock := `SELECT version FROM machines WHERE id = ?`
	if s.pg {
		lock += ` FOR UPDATE`
	}
	var now int
	if err := tx.QueryRowContext(ctx, s.q(lock), id).Scan(&now); err != nil {
		if errors.Is(err, sql.ErrNoRows) {
			return errdefs.New(errdefs.ErrNotFound, "machine %s does not exist", id)
		}
		return err
	}
	if version > 0 && now != version {
		return errdefs.New(errdefs.ErrConflict, "machine %s is at version %d, not %d: read it again and retry", id, now, version)
	}
	for key, value := range kv {
		if value == "" {
			_, err = tx.ExecContext(ctx, s.q(`DELETE FROM machine_metadata WHERE machine_id = ? AND key = ?`), id, key)
		} else {
			_, err = tx.ExecContext(ctx, s.q(`INSERT INTO machine_metadata (machine_id, key, value) VALUES (?, ?, ?)
				ON CONFLICT (machine_id, key) DO UPDATE SET value = excluded.value`), id, key, value)
		}
		if err != nil {
			return fmt.Errorf("machine %s: setting metadata %s: %w", id, key, err)
		}
	}
	// Counted in the transaction, so that concurrent updates cannot pass the bound
	// together.
	var n int
	if err := tx.QueryRowContext(ctx, s.q(`SELECT count(*) FROM machine_metadata WHERE machine_id = ?`), id).Scan(&n); err != nil {
		return err
	}
	if n > machine.MaxMetadataKeys {
		return errdefs.Invalid("machine %s would have %d metadata keys, over the limit of %d: delete some first", id, n, machine.MaxMetadataKeys)
	}
	return tx.Commit()
}

func (s *DB) AddSnapshot(ctx context.Context, sn store.Snapshot) error {
	at := sn.CreatedAt
	if at.IsZero() {
		at = time.Now()
	}
	_, err := s.db.ExecContext(ctx, s.q(`INSERT INTO volume_snapshots (id, volume_id, path, size_bytes, stored_bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)`),
		sn.ID, sn.VolumeID, sn.Path, sn.SizeBytes, sn.StoredBytes, at.UTC())
	return err
}

// snapshotCols reads a snapshot with its volume's retention (volume_snapshots s JOIN
// volumes v).
const snapshotCols = `s.id, s.volume_id, s.path, s.size_bytes, s.stored_bytes, s.created_at, v.snapshot_retention`

func scanSnapshot(row interface{ Scan(...any) error }) (store.Snapshot, error) {
	var sn store.Snapshot
	err := row.Scan(&sn.ID, &sn.VolumeID, &sn.Path, &sn.SizeBytes, &sn.StoredBytes, &sn.CreatedAt, &sn.RetentionDays)
	return sn, err
}

func (s *DB) Snapshots(ctx context.Context, volumeID string) ([]store.Snapshot, error) {
	return s.snapshots(ctx, `WHERE s.volume_id = ?`, volumeID)
}

func (s *DB) AllSnapshots(ctx context.Context) ([]store.Snapshot, error) {
	return s.snapshots(ctx, ``)
}

func (s *DB) snapshots(ctx context.Context, where string, args ...any) ([]store.Snapshot, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT `+snapshotCols+` FROM volume_snapshots s JOIN volumes v ON v.id = s.volume_id `+
		where+` ORDER BY s.created_at, s.id`), args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.Snapshot
	for rows.Next() {
		sn, err := scanSnapshot(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, sn)
	}
	return out, rows.Err()
}

func (s *DB) Snapshot(ctx context.Context, app, id string) (store.Snapshot, error) {
	sn, err := scanSnapshot(s.db.QueryRowContext(ctx, s.q(`SELECT `+snapshotCols+` FROM volume_snapshots s
		JOIN volumes v ON v.id = s.volume_id WHERE s.id = ? AND v.app = ?`), id, app))
	if errors.Is(err, sql.ErrNoRows) {
		return sn, errdefs.New(errdefs.ErrNotFound, "app %s has no volume snapshot %s: list them with GET /v1/apps/%s/volumes/VOLUME/snapshots", app, id, app)
	}
	return sn, err
}

func (s *DB) DeleteSnapshot(ctx context.Context, id string) error {
	_, err := s.db.ExecContext(ctx, s.q(`DELETE FROM volume_snapshots WHERE id = ?`), id)
	return err
}

func (s *DB) Note(ctx context.Context, id string, ev machine.Event) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var app, host string
	if err := tx.QueryRowContext(ctx, s.q(`SELECT state, app, host FROM machines WHERE id = ?`), id).Scan(&ev.Status, &app, &host); err != nil {
		return errdefs.New(errdefs.ErrNotFound, "machine %s does not exist", id)
	}
	if err := s.appendEvent(ctx, tx, id, app, host, ev); err != nil {
		return err
	}
	return s.commit(tx)
}

var _ store.Builds = (*DB)(nil)

const buildCols = `id, project, branch, state, attempt, spec, result, not_before, created_at, updated_at, host`

func scanBuild(row interface{ Scan(...any) error }) (store.Build, error) {
	var b store.Build
	var spec, result string
	err := row.Scan(&b.ID, &b.Project, &b.Branch, &b.State, &b.Attempt, &spec, &result, &b.NotBefore, &b.CreatedAt, &b.UpdatedAt, &b.Host)
	b.Spec, b.Result = json.RawMessage(spec), json.RawMessage(result)
	return b, err
}

func (s *DB) CreateBuild(ctx context.Context, b store.Build) error {
	if len(b.Result) == 0 {
		b.Result = json.RawMessage("{}")
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	_, err = tx.ExecContext(ctx, s.q(`INSERT INTO builds (`+buildCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`),
		b.ID, b.Project, b.Branch, b.State, b.Attempt, string(b.Spec), string(b.Result), b.NotBefore.UTC(), b.CreatedAt.UTC(), b.UpdatedAt.UTC(), b.Host)
	if err != nil {
		return err
	}
	if err := s.appendJournal(ctx, tx, buildEvent(b)); err != nil {
		return err
	}
	return s.commit(tx)
}

func (s *DB) GetBuild(ctx context.Context, id string) (store.Build, error) {
	b, err := scanBuild(s.db.QueryRowContext(ctx, s.q(`SELECT `+buildCols+` FROM builds WHERE id = ?`), id))
	if errors.Is(err, sql.ErrNoRows) {
		return b, errdefs.New(errdefs.ErrNotFound, "build %s does not exist", id)
	}
	return b, err
}

func (s *DB) queryBuilds(ctx context.Context, q string, args ...any) ([]store.Build, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT `+buildCols+` FROM builds `+q), args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.Build
	for rows.Next() {
		b, err := scanBuild(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, rows.Err()
}

func (s *DB) ListBuilds(ctx context.Context, project string) ([]store.Build, error) {
	return s.queryBuilds(ctx, `WHERE project = ? ORDER BY created_at DESC, id DESC`, project)
}

func (s *DB) BuildsInState(ctx context.Context, states ...string) ([]store.Build, error) {
	if len(states) == 0 {
		return nil, nil
	}
	args := make([]any, len(states))
	for i, st := range states {
		args[i] = st
	}
	return s.queryBuilds(ctx, `WHERE state IN (?`+strings.Repeat(", ?", len(states)-1)+`) ORDER BY created_at, id`, args...)
}

func (s *DB) UpdateBuild(ctx context.Context, b store.Build, from store.BuildRev) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var project string
	err = tx.QueryRowContext(ctx, s.q(`UPDATE builds SET state = ?, attempt = ?, result = ?, not_before = ?, updated_at = ?, host = ?
		WHERE id = ? AND state = ? AND attempt = ? AND host = ? RETURNING project`),
		b.State, b.Attempt, string(b.Result), b.NotBefore.UTC(), time.Now().UTC(), b.Host, b.ID, from.State, from.Attempt, from.Host).Scan(&project)
	if errors.Is(err, sql.ErrNoRows) {
		tx.Rollback()
		cur, err := s.GetBuild(ctx, b.ID)
		if err != nil {
			return err
		}
		return errdefs.New(errdefs.ErrConflict, "build %s is %s (attempt %d%s), not %s (attempt %d%s): it changed meanwhile",
			b.ID, cur.State, cur.Attempt, onHost(cur.Host), from.State, from.Attempt, onHost(from.Host))
	}
	if err != nil {
		return err
	}
	// A change of the result alone (its image pruned, say) is no event; a new state or
	// a new attempt (a retry going back to queued, then running) is.
	if b.State != from.State || b.Attempt != from.Attempt {
		b.Project = project
		if err := s.appendJournal(ctx, tx, buildEvent(b)); err != nil {
			return err
		}
	}
	return s.commit(tx)
}

func onHost(h string) string {
	if h == "" {
		return ""
	}
	return " on host " + h
}

var _ store.Hosts = (*DB)(nil)

const hostCols = `name, api_url, peer_url, cpus, memory_mib, cpu_ratio, memory_ratio, reserve_cpus, reserve_memory_mib, cordoned, heartbeat_at`

// RegisterHost records a host joining (or rejoining) with what it offers; its cordon
// stays as it was.
func (s *DB) RegisterHost(ctx context.Context, h store.Host) error {
	_, err := s.db.ExecContext(ctx, s.q(`INSERT INTO hosts (`+hostCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (name) DO UPDATE SET api_url = excluded.api_url, peer_url = excluded.peer_url, cpus = excluded.cpus, memory_mib = excluded.memory_mib,
		cpu_ratio = excluded.cpu_ratio, memory_ratio = excluded.memory_ratio, reserve_cpus = excluded.reserve_cpus,
		reserve_memory_mib = excluded.reserve_memory_mib, heartbeat_at = excluded.heartbeat_at`),
		h.Name, h.APIURL, h.PeerURL, h.CPUs, h.MemoryMiB, h.CPURatio, h.MemRatio, h.ReserveCPUs, h.ReserveMemoryMiB, h.Cordoned, h.HeartbeatAt.UTC())
	return err
}

// Heartbeat says the host is alive now.
func (s *DB) Heartbeat(ctx context.Context, name string, at time.Time) error {
	res, err := s.db.ExecContext(ctx, s.q(`UPDATE hosts SET heartbeat_at = ? WHERE name = ?`), at.UTC(), name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return errdefs.New(errdefs.ErrNotFound, "host %s is not registered", name)
	}
	return nil
}

// ListHosts lists the hosts by name.
func (s *DB) ListHosts(ctx context.Context) ([]store.Host, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT `+hostCols+` FROM hosts ORDER BY name`))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.Host
	for rows.Next() {
		var h store.Host
		if err := rows.Scan(&h.Name, &h.APIURL, &h.PeerURL, &h.CPUs, &h.MemoryMiB, &h.CPURatio, &h.MemRatio, &h.ReserveCPUs, &h.ReserveMemoryMiB, &h.Cordoned, &h.HeartbeatAt); err != nil {
			return nil, err
		}
		out = append(out, h)
	}
	return out, rows.Err()
}

// SetHostCordoned cordons or uncordons a host.
func (s *DB) SetHostCordoned(ctx context.Context, name string, c bool) error {
	res, err := s.db.ExecContext(ctx, s.q(`UPDATE hosts SET cordoned = ? WHERE name = ?`), c, name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return errdefs.New(errdefs.ErrNotFound, "no host %s: list them with `kiln host ls`", name)
	}
	return nil
}

// Setting returns a cluster-wide setting, storing def first if it is not set: the first
// host to start decides.
func (s *DB) Setting(ctx context.Context, key, def string) (string, error) {
	if _, err := s.db.ExecContext(ctx, s.q(`INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING`), key, def); err != nil {
		return "", err
	}
	var v string
	return v, s.db.QueryRowContext(ctx, s.q(`SELECT value FROM settings WHERE key = ?`), key).Scan(&v)
}

// PutBuildContext keeps a build's context (a compressed tar) where every host can read it.
func (s *DB) PutBuildContext(ctx context.Context, id string, data []byte) error {
	_, err := s.db.ExecContext(ctx, s.q(`INSERT INTO build_contexts (build_id, data) VALUES (?, ?)`), id, data)
	return err
}

// BuildContext returns a build's stored context.
func (s *DB) BuildContext(ctx context.Context, id string) ([]byte, error) {
	var b []byte
	err := s.db.QueryRowContext(ctx, s.q(`SELECT data FROM build_contexts WHERE build_id = ?`), id).Scan(&b)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, errdefs.New(errdefs.ErrNotFound, "build %s has no stored context", id)
	}
	return b, err
}

// DeleteBuildContext drops a finished build's context.
func (s *DB) DeleteBuildContext(ctx context.Context, id string) error {
	_, err := s.db.ExecContext(ctx, s.q(`DELETE FROM build_contexts WHERE build_id = ?`), id)
	return err
}

// ClockSkew is how far this host's clock is from the database server's; zero on SQLite,
// where they are the same machine.
func (s *DB) ClockSkew(ctx context.Context) (time.Duration, error) {
	if !s.pg {
		return 0, nil
	}
	var dbNow time.Time
	before := time.Now()
	if err := s.db.QueryRowContext(ctx, `SELECT CURRENT_TIMESTAMP`).Scan(&dbNow); err != nil {
		return 0, err
	}
	local := before.Add(time.Since(before) / 2)
	return local.Sub(dbNow), nil
}

// MoveMachine records that a stopped machine now belongs to another host. A stopped
// machine holds no room, so no host's usage changes.
func (s *DB) MoveMachine(ctx context.Context, id, host string) error {
	res, err := s.db.ExecContext(ctx, s.q(`UPDATE machines SET host = ?, updated_at = ? WHERE id = ? AND state = ?`), host, time.Now().UTC(), id, machine.Stopped)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return errdefs.New(errdefs.ErrConflict, "machine %s is not stopped: only a stopped machine moves", id)
	}
	return nil
}

// AllMachines lists every machine, of every app and host, oldest first.
func (s *DB) AllMachines(ctx context.Context) ([]store.Machine, error) {
	return s.queryMachines(ctx, `SELECT `+machineCols+` FROM machines ORDER BY created_at, id`)
}

// MachinesOnHost lists the machines placed on host, of every app, oldest first.
func (s *DB) MachinesOnHost(ctx context.Context, host string) ([]store.Machine, error) {
	return s.queryMachines(ctx, `SELECT `+machineCols+` FROM machines WHERE host = ? ORDER BY created_at, id`, host)
}

// sizeOf reads the guest's size from a machine's config, as placement counts it; a
// config without one (or not JSON) counts as nothing.
func sizeOf(config []byte) store.Usage {
	var c struct {
		Guest api.Guest `json:"guest"`
	}
	json.Unmarshal(config, &c)
	return store.Usage{CPUs: c.Guest.CPUs, MemoryMiB: c.Guest.MemoryMB}
}

// addUsage changes a host's usage by a machine's size, in the transaction that moves the
// machine into or out of a state that holds room.
func (s *DB) addUsage(ctx context.Context, tx *sql.Tx, host string, cpus, memMiB int) error {
	_, err := tx.ExecContext(ctx, s.q(`INSERT INTO host_usage (host, cpus, memory_mib) VALUES (?, ?, ?)
		ON CONFLICT (host) DO UPDATE SET cpus = host_usage.cpus + excluded.cpus, memory_mib = host_usage.memory_mib + excluded.memory_mib`),
		host, cpus, memMiB)
	return err
}

// HostUsage is what the machines holding room ask for, per host, as kept by the
// transactions that change machines: one row per host, not a sum over every machine.
func (s *DB) HostUsage(ctx context.Context) (map[string]store.Usage, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT host, cpus, memory_mib FROM host_usage`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]store.Usage{}
	for rows.Next() {
		var h string
		var u store.Usage
		if err := rows.Scan(&h, &u.CPUs, &u.MemoryMiB); err != nil {
			return nil, err
		}
		if u != (store.Usage{}) {
			out[h] = u
		}
	}
	return out, rows.Err()
}
