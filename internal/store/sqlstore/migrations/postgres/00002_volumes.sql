-- +goose Up
CREATE TABLE volumes (
    id               TEXT PRIMARY KEY,
    app              TEXT NOT NULL REFERENCES apps(name),
    name             TEXT NOT NULL,
    size_bytes       BIGINT NOT NULL,
    path             TEXT NOT NULL,
    attached_machine TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    UNIQUE (app, name)
);

-- +goose Down
DROP TABLE volumes;
