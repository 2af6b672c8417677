package client

import (
	"context"
	"net/http"
	"net/url"
	"strconv"

	"github.com/kilnhq/kiln/api"
)

func apath(app string) string { return "/v1/apps/" + url.PathEscape(app) }

// Plan asks what deploying req would change, changing nothing.
func (c *Client) Plan(ctx context.Context, app string, req api.DeployRequest) (api.Plan, error) {
	var out api.Plan
	err := c.do(ctx, http.MethodPost, apath(app)+"/plan", req, &out)
	return out, err
}

// Deploy starts a deploy on the server and returns its release and plan at once.
func (c *Client) Deploy(ctx context.Context, app string, req api.DeployRequest) (api.DeployResponse, error) {
	var out api.DeployResponse
	err := c.do(ctx, http.MethodPost, apath(app)+"/deploys", req, &out)
	return out, err
}

// Rollback deploys an earlier release again (0: the one before the latest).
func (c *Client) Rollback(ctx context.Context, app string, version int) (api.DeployResponse, error) {
	var out api.DeployResponse
	err := c.do(ctx, http.MethodPost, apath(app)+"/rollback", api.RollbackRequest{Version: version}, &out)
	return out, err
}

// Scale deploys the latest release with a process group's count changed.
func (c *Client) Scale(ctx context.Context, app, group string, count int) (api.DeployResponse, error) {
	var out api.DeployResponse
	err := c.do(ctx, http.MethodPost, apath(app)+"/scale", api.ScaleRequest{Group: group, Count: count}, &out)
	return out, err
}

func (c *Client) Releases(ctx context.Context, app string) ([]api.Release, error) {
	var out []api.Release
	err := c.do(ctx, http.MethodGet, apath(app)+"/releases", nil, &out)
	return out, err
}

func (c *Client) Release(ctx context.Context, app string, version int) (api.Release, error) {
	var out api.Release
	err := c.do(ctx, http.MethodGet, apath(app)+"/releases/"+strconv.Itoa(version), nil, &out)
	return out, err
}

// Secrets lists the names of an app's secrets.
func (c *Client) Secrets(ctx context.Context, app string) (api.Secrets, error) {
	var out api.Secrets
	err := c.do(ctx, http.MethodGet, apath(app)+"/secrets", nil, &out)
	return out, err
}

// SetSecrets sets secrets as one new version.
func (c *Client) SetSecrets(ctx context.Context, app string, values map[string]string) (api.Secrets, error) {
	var out api.Secrets
	err := c.do(ctx, http.MethodPost, apath(app)+"/secrets", api.SecretsRequest{Values: values}, &out)
	return out, err
}

// UnsetSecret removes a secret, making a new version.
func (c *Client) UnsetSecret(ctx context.Context, app, name string) (api.Secrets, error) {
	var out api.Secrets
	err := c.do(ctx, http.MethodDelete, apath(app)+"/secrets/"+url.PathEscape(name), nil, &out)
	return out, err
}
