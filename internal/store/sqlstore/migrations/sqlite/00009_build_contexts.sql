-- +goose Up
CREATE TABLE build_contexts (
    build_id TEXT PRIMARY KEY,
    data     BLOB NOT NULL
);

-- +goose Down
DROP TABLE build_contexts;
