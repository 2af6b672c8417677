-- +goose Up
ALTER TABLE builds ADD COLUMN host TEXT NOT NULL DEFAULT '';

-- +goose Down
ALTER TABLE builds DROP COLUMN host;
