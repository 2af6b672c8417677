package sqlstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

var (
	_ store.Releases = (*DB)(nil)
	_ store.Secrets  = (*DB)(nil)
)

// maxReleaseMessage bounds a release's message: a failed deploy's reason can carry what
// a health check or a release command printed.
const maxReleaseMessage = 4096

var releaseStates = []string{store.ReleasePending, store.ReleaseRunning, store.ReleaseSucceeded, store.ReleaseFailed, store.ReleaseRolledBack}

func checkReleaseState(state string) error {
	if !slices.Contains(releaseStates, state) {
		return errdefs.Invalid("release state %q is none of %v", state, releaseStates)
	}
	return nil
}

// releaseEvent is the journal's entry for a release entering its state, so that the
// journal shows deploys beside the machine events they cause.
func releaseEvent(r store.Release) store.Event {
	msg := fmt.Sprintf("release %d %s", r.Version, r.State)
	if r.RollbackOf > 0 {
		msg += fmt.Sprintf(" (a rollback to release %d)", r.RollbackOf)
	}
	if r.Message != "" {
		msg += ": " + r.Message
	}
	return store.Event{Time: r.UpdatedAt, Type: "release." + r.State, App: r.App, State: r.State, Message: msg}
}

const releaseCols = `app, version, state, strategy, image, config, secrets_version, token, rollback_of, progress, message, created_at, updated_at`

func scanRelease(row interface{ Scan(...any) error }) (store.Release, error) {
	var r store.Release
	var cfg, progress string
	err := row.Scan(&r.App, &r.Version, &r.State, &r.Strategy, &r.Image, &cfg, &r.SecretsVersion, &r.Token, &r.RollbackOf, &progress, &r.Message, &r.CreatedAt, &r.UpdatedAt)
	if cfg != "" {
		r.Config = json.RawMessage(cfg)
	}
	if progress != "" {
		r.Progress = json.RawMessage(progress)
	}
	return r, err
}

// stamp is the time the store records, as the database keeps it (PostgreSQL to the
// microsecond), so that what a create returns equals what a read gives.
func stamp() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }

func (s *DB) CreateRelease(ctx context.Context, r store.Release) (store.Release, error) {
	if r.State == "" {
		r.State = store.ReleasePending
	}
	if err := checkReleaseState(r.State); err != nil {
		return r, err
	}
	r.Message = store.CleanText(r.Message, maxReleaseMessage)
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return r, err
	}
	defer tx.Rollback()
	// The counter's row is locked until the commit (PostgreSQL; SQLite has one writer at
	// a time), so concurrent creates take one number each.
	err = tx.QueryRowContext(ctx, s.q(`INSERT INTO release_counters (app, last) VALUES (?, 1)
		ON CONFLICT (app) DO UPDATE SET last = release_counters.last + 1 RETURNING last`), r.App).Scan(&r.Version)
	if err != nil {
		if isForeignKey(err) {
			return r, errdefs.New(errdefs.ErrNotFound, "app %s does not exist: create it first", r.App)
		}
		return r, fmt.Errorf("numbering a release of app %s: %w", r.App, err)
	}
	r.CreatedAt = stamp()
	r.UpdatedAt = r.CreatedAt
	_, err = tx.ExecContext(ctx, s.q(`INSERT INTO releases (`+releaseCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`),
		r.App, r.Version, r.State, r.Strategy, r.Image, string(r.Config), r.SecretsVersion, r.Token, r.RollbackOf, string(r.Progress), r.Message, r.CreatedAt, r.UpdatedAt)
	if err != nil {
		return r, fmt.Errorf("recording release %d of app %s: %w", r.Version, r.App, err)
	}
	if err := s.appendJournal(ctx, tx, releaseEvent(r)); err != nil {
		return r, err
	}
	return r, s.commit(tx)
}

func (s *DB) GetRelease(ctx context.Context, app string, version int) (store.Release, error) {
	r, err := scanRelease(s.db.QueryRowContext(ctx, s.q(`SELECT `+releaseCols+` FROM releases WHERE app = ? AND version = ?`), app, version))
	if errors.Is(err, sql.ErrNoRows) {
		return r, errdefs.New(errdefs.ErrNotFound, "app %s has no release %d: list them with `kiln releases --app %s`", app, version, app)
	}
	return r, err
}

func (s *DB) ListReleases(ctx context.Context, app string, limit int) ([]store.Release, error) {
	q, args := `WHERE app = ? ORDER BY version DESC`, []any{app}
	if limit > 0 {
		q, args = q+` LIMIT ?`, append(args, limit)
	}
	return s.queryReleases(ctx, q, args...)
}

func (s *DB) PruneReleases(ctx context.Context, app string, keep int) (int, error) {
	// The latest that succeeded stays, however old: rollbacks and scales start from it.
	res, err := s.db.ExecContext(ctx, s.q(`DELETE FROM releases WHERE app = ? AND state IN (?, ?, ?)
		AND version <= (SELECT MAX(version) FROM releases WHERE app = ?) - ?
		AND version <> COALESCE((SELECT MAX(version) FROM releases WHERE app = ? AND state = ?), 0)`),
		app, store.ReleaseSucceeded, store.ReleaseFailed, store.ReleaseRolledBack, app, keep, app, store.ReleaseSucceeded)
	if err != nil {
		return 0, err
	}
	n, err := res.RowsAffected()
	return int(n), err
}

func (s *DB) ReleasesInState(ctx context.Context, states ...string) ([]store.Release, error) {
	if len(states) == 0 {
		return nil, nil
	}
	return s.queryReleases(ctx, `WHERE state IN (`+marks(len(states))+`) ORDER BY created_at, app, version`, appendAll(nil, states)...)
}

func (s *DB) queryReleases(ctx context.Context, q string, args ...any) ([]store.Release, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT `+releaseCols+` FROM releases `+q), args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.Release
	for rows.Next() {
		r, err := scanRelease(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

func (s *DB) UpdateRelease(ctx context.Context, r store.Release, from string) error {
	if err := checkReleaseState(r.State); err != nil {
		return err
	}
	r.Message = store.CleanText(r.Message, maxReleaseMessage)
	r.UpdatedAt = stamp()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	err = tx.QueryRowContext(ctx, s.q(`UPDATE releases SET state = ?, progress = ?, message = ?, updated_at = ?
		WHERE app = ? AND version = ? AND state = ? RETURNING rollback_of`),
		r.State, string(r.Progress), r.Message, r.UpdatedAt, r.App, r.Version, from).Scan(&r.RollbackOf)
	if errors.Is(err, sql.ErrNoRows) {
		var cur string
		err := tx.QueryRowContext(ctx, s.q(`SELECT state FROM releases WHERE app = ? AND version = ?`), r.App, r.Version).Scan(&cur)
		if errors.Is(err, sql.ErrNoRows) {
			return errdefs.New(errdefs.ErrNotFound, "app %s has no release %d", r.App, r.Version)
		}
		if err != nil {
			return err
		}
		return errdefs.New(errdefs.ErrConflict, "release %d of app %s is %s, not %s: it changed meanwhile", r.Version, r.App, cur, from)
	}
	if err != nil {
		return err
	}
	// Progress alone is no event: a deploy records it at every step.
	if r.State != from {
		if err := s.appendJournal(ctx, tx, releaseEvent(r)); err != nil {
			return err
		}
	}
	return s.commit(tx)
}

func (s *DB) PutSecrets(ctx context.Context, app string, prev int, sealed []byte) (int, error) {
	if prev < 0 || len(sealed) == 0 {
		return 0, errdefs.Invalid("secrets of app %s: version %d with %d sealed bytes: the previous version is 0 or more and the sealed secrets are not empty", app, prev, len(sealed))
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback()
	var latest int
	if err := tx.QueryRowContext(ctx, s.q(`SELECT COALESCE(MAX(version), 0) FROM secrets WHERE app = ?`), app).Scan(&latest); err != nil {
		return 0, err
	}
	if latest != prev {
		return 0, secretsMoved(app, latest, prev)
	}
	// Two puts on PostgreSQL can both read the same latest; the primary key lets one
	// insert prev+1.
	_, err = tx.ExecContext(ctx, s.q(`INSERT INTO secrets (app, version, sealed, created_at) VALUES (?, ?, ?, ?)`), app, prev+1, sealed, stamp())
	switch {
	case err != nil && isUnique(err):
		return 0, secretsMoved(app, prev+1, prev)
	case err != nil && isForeignKey(err):
		return 0, errdefs.New(errdefs.ErrNotFound, "app %s does not exist: create it first", app)
	case err != nil:
		return 0, fmt.Errorf("storing secrets version %d of app %s: %w", prev+1, app, err)
	}
	return prev + 1, tx.Commit()
}

func secretsMoved(app string, latest, prev int) error {
	return errdefs.New(errdefs.ErrConflict, "the secrets of app %s are at version %d, not %d: they changed meanwhile, read them again and retry", app, latest, prev)
}

func (s *DB) SecretsAt(ctx context.Context, app string, version int) (store.SecretsVersion, error) {
	if version < 0 {
		return store.SecretsVersion{}, errdefs.Invalid("secrets version %d of app %s: versions count from 1 (0 is the latest)", version, app)
	}
	q, args := `WHERE app = ? ORDER BY version DESC LIMIT 1`, []any{app}
	if version > 0 {
		q, args = `WHERE app = ? AND version = ?`, append(args, version)
	}
	sv := store.SecretsVersion{}
	err := s.db.QueryRowContext(ctx, s.q(`SELECT app, version, sealed, created_at FROM secrets `+q), args...).Scan(&sv.App, &sv.Version, &sv.Sealed, &sv.CreatedAt)
	switch {
	case errors.Is(err, sql.ErrNoRows) && version == 0:
		return store.SecretsVersion{}, nil
	case errors.Is(err, sql.ErrNoRows):
		return sv, errdefs.New(errdefs.ErrNotFound, "app %s has no secrets version %d", app, version)
	}
	return sv, err
}
