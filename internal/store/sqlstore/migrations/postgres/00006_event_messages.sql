-- +goose Up
ALTER TABLE machine_events ADD COLUMN message TEXT NOT NULL DEFAULT '';

-- +goose Down
ALTER TABLE machine_events DROP COLUMN message;
