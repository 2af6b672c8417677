-- +goose Up
-- A machine's size is kept beside its config, and each host's usage (what its machines
-- holding room ask for) is kept up to date by the transactions that change a machine, so
-- that placing a machine reads one row per host instead of every machine.
ALTER TABLE machines ADD COLUMN cpus INTEGER NOT NULL DEFAULT 0;
ALTER TABLE machines ADD COLUMN memory_mib INTEGER NOT NULL DEFAULT 0;
UPDATE machines SET cpus = COALESCE((config::jsonb #>> '{guest,cpus}')::integer, 0),
    memory_mib = COALESCE((config::jsonb #>> '{guest,memory_mb}')::integer, 0);

CREATE TABLE host_usage (
    host       TEXT PRIMARY KEY,
    cpus       INTEGER NOT NULL DEFAULT 0,
    memory_mib INTEGER NOT NULL DEFAULT 0
);
-- The states that hold room are the ones sqlstore.holdsRoom names.
INSERT INTO host_usage (host, cpus, memory_mib)
    SELECT host, SUM(cpus), SUM(memory_mib) FROM machines
    WHERE state IN ('starting', 'started', 'stopping', 'suspending') GROUP BY host;

-- A host's own machines (claims, drains) are found without reading the others'.
CREATE INDEX machines_by_host ON machines (host, state);

-- +goose Down
DROP INDEX machines_by_host;
DROP TABLE host_usage;
ALTER TABLE machines DROP COLUMN memory_mib;
ALTER TABLE machines DROP COLUMN cpus;
