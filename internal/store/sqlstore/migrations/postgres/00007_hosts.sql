-- +goose Up
CREATE TABLE hosts (
    name               TEXT PRIMARY KEY,
    api_url            TEXT NOT NULL,
    cpus               INTEGER NOT NULL,
    memory_mib         INTEGER NOT NULL,
    cpu_ratio          REAL NOT NULL,
    memory_ratio       REAL NOT NULL,
    reserve_cpus       INTEGER NOT NULL,
    reserve_memory_mib INTEGER NOT NULL,
    cordoned           BOOLEAN NOT NULL DEFAULT FALSE,
    heartbeat_at       TIMESTAMPTZ NOT NULL
);
ALTER TABLE machines ADD COLUMN host TEXT NOT NULL DEFAULT '';

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- +goose Down
DROP TABLE settings;
ALTER TABLE machines DROP COLUMN host;
DROP TABLE hosts;
