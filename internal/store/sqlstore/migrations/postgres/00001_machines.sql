-- +goose Up
CREATE TABLE apps (
    name       TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE machines (
    id         TEXT PRIMARY KEY,
    app        TEXT NOT NULL REFERENCES apps(name),
    name       TEXT NOT NULL,
    state      TEXT NOT NULL,
    config     TEXT NOT NULL,
    version    INTEGER NOT NULL DEFAULT 1,
    exit_code  INTEGER,
    restarts   INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    UNIQUE (app, name)
);

CREATE TABLE machine_events (
    seq        BIGSERIAL PRIMARY KEY,
    machine_id TEXT NOT NULL REFERENCES machines(id),
    type       TEXT NOT NULL,
    status     TEXT NOT NULL,
    source     TEXT NOT NULL,
    ts         TIMESTAMPTZ NOT NULL,
    exit_code  INTEGER
);
CREATE INDEX machine_events_machine ON machine_events(machine_id, seq);

-- +goose Down
DROP TABLE machine_events;
DROP TABLE machines;
DROP TABLE apps;
