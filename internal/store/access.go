package store

import (
	"context"
	"time"
)

// Token is the record of an issued token. The token itself is never kept: Hash is its
// SHA-256, enough to recognise it and useless to call with.
type Token struct {
	ID   string `json:"id"`
	Hash string `json:"hash"`
	// Description is what it allows, as `kiln tokens ls` shows it.
	Description string    `json:"description"`
	CreatedBy   string    `json:"created_by"`
	CreatedAt   time.Time `json:"created_at"`
	ExpiresAt   time.Time `json:"expires_at,omitzero"`
	RevokedAt   time.Time `json:"revoked_at,omitzero"`
}

// Tokens persists issued tokens and their revocations.
type Tokens interface {
	CreateToken(ctx context.Context, t Token) error
	// GetToken returns a token's record; an unknown ID is ErrNotFound.
	GetToken(ctx context.Context, id string) (Token, error)
	ListTokens(ctx context.Context) ([]Token, error)
	// RevokeToken marks a token revoked at at; revoking one already revoked keeps the
	// first time. An unknown ID is ErrNotFound.
	RevokeToken(ctx context.Context, id string, at time.Time) error
}

// AuditEntry is one recorded call: a change, or a refusal.
type AuditEntry struct {
	ID      int64     `json:"id"`
	At      time.Time `json:"at"`
	TokenID string    `json:"token_id"`
	App     string    `json:"app,omitempty"`
	// Action is the route called ("POST /v1/apps/{app}/machines"); Target the thing it
	// named (a machine, volume, build or host ID).
	Action string `json:"action"`
	Target string `json:"target,omitempty"`
	// Result is the HTTP status answered.
	Result int    `json:"result"`
	Source string `json:"source"`
}

// maxAuditField bounds each text field of an audit entry: they come from request paths,
// which a caller makes as long as the header limit allows.
const maxAuditField = 256

// Clipped returns e with every text field at most maxAuditField bytes, a cut one
// ending in "…". auditlog.Record clips every entry it writes.
func (e AuditEntry) Clipped() AuditEntry {
	for _, f := range []*string{&e.TokenID, &e.App, &e.Action, &e.Target, &e.Source} {
		*f = clip(*f, maxAuditField)
	}
	return e
}

// AuditFilter selects audit entries.
type AuditFilter struct {
	App   string
	Since time.Time
	// Apps, when not nil, limits the entries to these apps (a scoped reader's).
	Apps  []string
	Limit int
}

// Audit persists the audit log. It is only ever appended to.
type Audit interface {
	AddAudit(ctx context.Context, e AuditEntry) error
	// ListAudit lists entries oldest first.
	ListAudit(ctx context.Context, f AuditFilter) ([]AuditEntry, error)
	// PruneAudit deletes the entries older than before (the operator's retention), and
	// says how many.
	PruneAudit(ctx context.Context, before time.Time) (int64, error)
}
