-- +goose Up
CREATE TABLE volume_snapshots (
    id         TEXT PRIMARY KEY,
    volume_id  TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
    path       TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);

-- +goose Down
DROP TABLE volume_snapshots;
