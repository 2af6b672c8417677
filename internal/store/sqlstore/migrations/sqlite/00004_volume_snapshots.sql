-- +goose Up
CREATE TABLE volume_snapshots (
    id         TEXT PRIMARY KEY,
    volume_id  TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
    path       TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at TIMESTAMP NOT NULL
);

-- +goose Down
DROP TABLE volume_snapshots;
