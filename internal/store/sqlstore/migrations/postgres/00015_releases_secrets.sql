-- +goose Up
-- Every deploy of an app, numbered per app from 1. The deploy keeps its progress here,
-- so that a server killed mid-deploy resumes it; state changes only by compare and swap.
CREATE TABLE releases (
    app             TEXT NOT NULL REFERENCES apps(name),
    version         INTEGER NOT NULL,
    state           TEXT NOT NULL,
    strategy        TEXT NOT NULL DEFAULT '',
    image           TEXT NOT NULL DEFAULT '',
    config          TEXT NOT NULL DEFAULT '',
    secrets_version INTEGER NOT NULL DEFAULT 0,
    token           TEXT NOT NULL DEFAULT '',
    rollback_of     INTEGER NOT NULL DEFAULT 0,
    progress        TEXT NOT NULL DEFAULT '',
    message         TEXT NOT NULL DEFAULT '',
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (app, version)
);
CREATE INDEX releases_state ON releases (state, created_at);
-- The highest release version each app has had: a new release takes one more, in the
-- transaction that inserts it, so that concurrent deploys never share a number and a
-- number is never handed out again while the app exists.
CREATE TABLE release_counters (
    app  TEXT PRIMARY KEY REFERENCES apps(name),
    last INTEGER NOT NULL
);
-- Each version of an app's secrets, sealed (internal/secrets): never in clear here.
CREATE TABLE secrets (
    app        TEXT NOT NULL REFERENCES apps(name),
    version    INTEGER NOT NULL,
    sealed     BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (app, version)
);

-- +goose Down
DROP TABLE secrets;
DROP TABLE release_counters;
DROP TABLE releases;
