-- +goose Up
ALTER TABLE machines ADD COLUMN cordoned BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE machines ADD COLUMN lease_nonce TEXT NOT NULL DEFAULT '';
ALTER TABLE machines ADD COLUMN lease_expires TIMESTAMPTZ;
ALTER TABLE machines ADD COLUMN lease_description TEXT NOT NULL DEFAULT '';

CREATE TABLE machine_metadata (
    machine_id TEXT NOT NULL REFERENCES machines(id),
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (machine_id, key)
);

-- +goose Down
DROP TABLE machine_metadata;
