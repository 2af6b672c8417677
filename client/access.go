package client

import (
	"context"
	"net/url"

	"github.com/kilnhq/kiln/api"
)

// CreateToken issues a token (the operator's token only).
func (c *Client) CreateToken(ctx context.Context, req api.CreateTokenRequest) (api.Token, error) {
	var out api.Token
	return out, c.do(ctx, "POST", "/v1/tokens", req, &out)
}

// Tokens lists issued tokens.
func (c *Client) Tokens(ctx context.Context) ([]api.Token, error) {
	var out []api.Token
	return out, c.do(ctx, "GET", "/v1/tokens", nil, &out)
}

// RevokeToken revokes a token by ID.
func (c *Client) RevokeToken(ctx context.Context, id string) (api.Token, error) {
	var out api.Token
	return out, c.do(ctx, "DELETE", "/v1/tokens/"+url.PathEscape(id), nil, &out)
}

// WhoAmI says what the client's token is.
func (c *Client) WhoAmI(ctx context.Context) (api.Identity, error) {
	var out api.Identity
	return out, c.do(ctx, "GET", "/v1/tokens/current", nil, &out)
}

// Audit reads the audit log; app and since ("1h" or an RFC 3339 time) may be empty.
func (c *Client) Audit(ctx context.Context, app, since string) ([]api.AuditEntry, error) {
	q := url.Values{}
	if app != "" {
		q.Set("app", app)
	}
	if since != "" {
		q.Set("since", since)
	}
	var out []api.AuditEntry
	return out, c.do(ctx, "GET", "/v1/audit?"+q.Encode(), nil, &out)
}
