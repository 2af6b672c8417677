-- +goose Up
-- Issued tokens, by ID: a token is never stored, only its SHA-256. A revoked token keeps
-- its record (revoked_at set), so it stays refused and listed.
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    expires_at  TIMESTAMP,
    revoked_at  TIMESTAMP
);
-- Every change and every refusal, appended and never edited.
CREATE TABLE audit (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       TIMESTAMP NOT NULL,
    token_id TEXT NOT NULL,
    app      TEXT NOT NULL DEFAULT '',
    action   TEXT NOT NULL,
    target   TEXT NOT NULL DEFAULT '',
    result   INTEGER NOT NULL,
    source   TEXT NOT NULL
);
CREATE INDEX audit_app_at ON audit (app, at);
CREATE INDEX audit_at ON audit (at);
-- A lease records the token that took it.
ALTER TABLE machines ADD COLUMN lease_owner TEXT NOT NULL DEFAULT '';
-- Hosts used to share the admin token through this table in clear.
DELETE FROM settings WHERE key = 'admin_token';

-- +goose Down
DROP TABLE audit;
DROP TABLE tokens;
ALTER TABLE machines DROP COLUMN lease_owner;
