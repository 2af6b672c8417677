package api

import "time"

// CreateTokenRequest asks for a token. Apps and Projects limit what it reaches (none:
// everything, for a read, exec or deploy token of the operator's); Role is read, exec,
// deploy or admin; Expiry is a Go duration ("720h"), empty or "0" for none.
type CreateTokenRequest struct {
	Apps     []string `json:"apps,omitempty"`
	Projects []string `json:"projects,omitempty"`
	Role     string   `json:"role"`
	Expiry   string   `json:"expiry,omitempty"`
}

// Token is an issued token's record. Token itself is only in the answer to its creation:
// kiln keeps its hash.
type Token struct {
	ID          string    `json:"id"`
	Token       string    `json:"token,omitempty"`
	Description string    `json:"description"`
	CreatedBy   string    `json:"created_by"`
	CreatedAt   time.Time `json:"created_at"`
	ExpiresAt   time.Time `json:"expires_at,omitzero"`
	RevokedAt   time.Time `json:"revoked_at,omitzero"`
}

// Identity is who the caller's token says it is (GET /v1/tokens/current).
type Identity struct {
	TokenID  string    `json:"token_id"`
	Role     string    `json:"role"`
	Apps     []string  `json:"apps,omitempty"`
	Projects []string  `json:"projects,omitempty"`
	Operator bool      `json:"operator"`
	Limited  bool      `json:"limited"`
	Expires  time.Time `json:"expires,omitzero"`
}

// AuditEntry is one recorded call: a change or a refusal.
type AuditEntry struct {
	ID      int64     `json:"id"`
	At      time.Time `json:"at"`
	TokenID string    `json:"token_id"`
	App     string    `json:"app,omitempty"`
	Action  string    `json:"action"`
	Target  string    `json:"target,omitempty"`
	Result  int       `json:"result"`
	Source  string    `json:"source"`
}
