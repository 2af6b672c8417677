-- +goose Up
-- Where other hosts reach this host's peer listener (mutual TLS with the cluster's CA):
-- forwarded API calls and image pulls go there, never to the API's address. Empty for a
-- host that has not started since; calls to it fail until it does.
ALTER TABLE hosts ADD COLUMN peer_url TEXT NOT NULL DEFAULT '';

-- +goose Down
ALTER TABLE hosts DROP COLUMN peer_url;
