-- +goose Up
CREATE TABLE builds (
    id          TEXT PRIMARY KEY,
    project     TEXT NOT NULL,
    branch      TEXT NOT NULL DEFAULT '',
    state       TEXT NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 0,
    spec        TEXT NOT NULL,
    result      TEXT NOT NULL DEFAULT '{}',
    not_before  TIMESTAMPTZ NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX builds_project ON builds(project, created_at);
CREATE INDEX builds_state ON builds(state, created_at);

-- +goose Down
DROP TABLE builds;
