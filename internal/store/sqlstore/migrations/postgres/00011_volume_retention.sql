-- +goose Up
-- A volume keeps its snapshots snapshot_retention days (5 for new volumes, as on Fly)
-- and, with auto_backup_enabled, gets one a day; a snapshot records what it takes on
-- disk.
-- Volumes made before retention existed get 0: their snapshots were kept until deleted,
-- and an upgrade must not start deleting them (the sweep skips 0).
ALTER TABLE volumes ADD COLUMN snapshot_retention INTEGER NOT NULL DEFAULT 0;
ALTER TABLE volumes ADD COLUMN auto_backup_enabled BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE volume_snapshots ADD COLUMN stored_bytes BIGINT NOT NULL DEFAULT 0;

-- +goose Down
ALTER TABLE volume_snapshots DROP COLUMN stored_bytes;
ALTER TABLE volumes DROP COLUMN auto_backup_enabled;
ALTER TABLE volumes DROP COLUMN snapshot_retention;
