package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

var (
	_ store.Tokens = (*DB)(nil)
	_ store.Audit  = (*DB)(nil)
)

func nullTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UTC()
}

const tokenCols = `id, hash, description, created_by, created_at, expires_at, revoked_at`

func scanToken(row interface{ Scan(...any) error }) (store.Token, error) {
	var t store.Token
	var exp, rev sql.NullTime
	if err := row.Scan(&t.ID, &t.Hash, &t.Description, &t.CreatedBy, &t.CreatedAt, &exp, &rev); err != nil {
		return t, err
	}
	t.ExpiresAt, t.RevokedAt = exp.Time, rev.Time
	return t, nil
}

// CreateToken records an issued token.
func (s *DB) CreateToken(ctx context.Context, t store.Token) error {
	_, err := s.db.ExecContext(ctx, s.q(`INSERT INTO tokens (`+tokenCols+`) VALUES (?, ?, ?, ?, ?, ?, ?)`),
		t.ID, t.Hash, t.Description, t.CreatedBy, t.CreatedAt.UTC(), nullTime(t.ExpiresAt), nullTime(t.RevokedAt))
	if isUnique(err) {
		return errdefs.New(errdefs.ErrConflict, "token %s exists", t.ID)
	}
	return err
}

// GetToken returns a token's record.
func (s *DB) GetToken(ctx context.Context, id string) (store.Token, error) {
	t, err := scanToken(s.db.QueryRowContext(ctx, s.q(`SELECT `+tokenCols+` FROM tokens WHERE id = ?`), id))
	if errors.Is(err, sql.ErrNoRows) {
		return t, errdefs.New(errdefs.ErrNotFound, "no token %s: list them with `kiln tokens ls`", id)
	}
	return t, err
}

// ListTokens lists issued tokens, oldest first.
func (s *DB) ListTokens(ctx context.Context) ([]store.Token, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT `+tokenCols+` FROM tokens ORDER BY created_at, id`))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.Token
	for rows.Next() {
		t, err := scanToken(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

// RevokeToken marks a token revoked.
func (s *DB) RevokeToken(ctx context.Context, id string, at time.Time) error {
	if _, err := s.GetToken(ctx, id); err != nil {
		return err
	}
	_, err := s.db.ExecContext(ctx, s.q(`UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL`), at.UTC(), id)
	return err
}

// AddAudit appends an entry to the audit log.
func (s *DB) AddAudit(ctx context.Context, e store.AuditEntry) error {
	_, err := s.db.ExecContext(ctx, s.q(`INSERT INTO audit (at, token_id, app, action, target, result, source) VALUES (?, ?, ?, ?, ?, ?, ?)`),
		e.At.UTC(), e.TokenID, e.App, e.Action, e.Target, e.Result, e.Source)
	return err
}

// PruneAudit deletes entries older than before.
func (s *DB) PruneAudit(ctx context.Context, before time.Time) (int64, error) {
	res, err := s.db.ExecContext(ctx, s.q(`DELETE FROM audit WHERE at < ?`), before.UTC())
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// maxAuditRows bounds one read of the audit log.
const maxAuditRows = 10000

// ListAudit lists audit entries, oldest first.
func (s *DB) ListAudit(ctx context.Context, f store.AuditFilter) ([]store.AuditEntry, error) {
	q, args := `SELECT id, at, token_id, app, action, target, result, source FROM audit WHERE at >= ?`, []any{f.Since.UTC()}
	if f.App != "" {
		q, args = q+` AND app = ?`, append(args, f.App)
	}
	if f.Apps != nil {
		if len(f.Apps) == 0 {
			return nil, nil
		}
		q += ` AND app IN (?` + strings.Repeat(`, ?`, len(f.Apps)-1) + `)`
		for _, a := range f.Apps {
			args = append(args, a)
		}
	}
	limit := f.Limit
	if limit <= 0 || limit > maxAuditRows {
		limit = maxAuditRows
	}
	// The newest entries within the limit, returned oldest first.
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT * FROM (`+q+` ORDER BY id DESC LIMIT ?) AS recent ORDER BY id`), append(args, limit)...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.AuditEntry
	for rows.Next() {
		var e store.AuditEntry
		if err := rows.Scan(&e.ID, &e.At, &e.TokenID, &e.App, &e.Action, &e.Target, &e.Result, &e.Source); err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, rows.Err()
}
