-- +goose Up
CREATE TABLE build_contexts (
    build_id TEXT PRIMARY KEY,
    data     BYTEA NOT NULL
);

-- +goose Down
DROP TABLE build_contexts;
