-- +goose Up
-- The journal of everything that happens, across apps, machines and builds: one row per
-- machine event and per change of a build's state, written in the transaction that makes
-- the change, so that GET /v1/events can neither miss one nor show one that did not
-- happen. seq orders it and is what a follower resumes after; AUTOINCREMENT never hands
-- out a seq again once retention has deleted its row.
CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    ts         TIMESTAMP NOT NULL,
    type       TEXT NOT NULL,
    app        TEXT NOT NULL DEFAULT '',
    machine_id TEXT NOT NULL DEFAULT '',
    project    TEXT NOT NULL DEFAULT '',
    build_id   TEXT NOT NULL DEFAULT '',
    host       TEXT NOT NULL DEFAULT '',
    state      TEXT NOT NULL DEFAULT '',
    message    TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_app ON events (app, seq);
CREATE INDEX events_machine ON events (machine_id, seq);
CREATE INDEX events_project ON events (project, seq);
CREATE INDEX events_build ON events (build_id, seq);
CREATE INDEX events_ts ON events (ts);

-- +goose Down
DROP TABLE events;
