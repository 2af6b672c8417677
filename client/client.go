// Package client is the Go client of kiln's API; the kiln CLI uses nothing else to talk
// to a server. Errors from the server keep their kind (errdefs), so callers test them
// with errors.Is as they would locally.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// Client talks to one kiln server.
type Client struct {
	BaseURL string
	Token   string
	HTTP    *http.Client
}

// New returns a client for baseURL (like http://127.0.0.1:4280) with a bearer token.
func New(baseURL, token string) *Client {
	return &Client{BaseURL: strings.TrimRight(baseURL, "/"), Token: token, HTTP: &http.Client{}}
}

// Error is an error answer from the server.
type Error struct {
	Status  int
	Message string
}

func (e *Error) Error() string { return e.Message }

// Unwrap gives the error its kind back, read through errdefs' one table between kinds
// and statuses (the table the server answers with), so errors.Is works on a remote error
// as on a local one. A status no kind has (401, 500) gives none.
func (e *Error) Unwrap() error { return errdefs.KindOfStatus(e.Status) }

func (c *Client) request(ctx context.Context, method, path string, body io.Reader, ctype string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.BaseURL+path, body)
	if err != nil {
		return nil, err
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	return c.send(req)
}

// send authenticates req, sends it, and turns an error answer into an *Error.
func (c *Client) send(req *http.Request) (*http.Response, error) {
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		if req.Context().Err() != nil {
			return nil, err // the caller gave up; the server may be fine
		}
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "cannot reach the kiln server at %s (is `kiln server` running? set KILN_API_URL or --api-url)", c.BaseURL)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		var e api.Error
		b, _ := io.ReadAll(resp.Body)
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(b))
		}
		return nil, &Error{Status: resp.StatusCode, Message: e.Error}
	}
	return resp, nil
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	ctype := ""
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body, ctype = bytes.NewReader(b), "application/json"
	}
	resp, err := c.request(ctx, method, path, body, ctype)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out != nil {
		return json.NewDecoder(resp.Body).Decode(out)
	}
	return nil
}

func mpath(app, id string) string {
	return "/v1/apps/" + url.PathEscape(app) + "/machines/" + url.PathEscape(id)
}

// CreateApp creates an app.
func (c *Client) CreateApp(ctx context.Context, name string) error {
	return c.do(ctx, "POST", "/v1/apps", api.CreateAppRequest{AppName: name}, nil)
}

// ListApps lists apps.
func (c *Client) ListApps(ctx context.Context) ([]api.App, error) {
	var out api.AppList
	return out.Apps, c.do(ctx, "GET", "/v1/apps", nil, &out)
}

// CreateMachine creates and starts a machine.
func (c *Client) CreateMachine(ctx context.Context, app string, req api.CreateMachineRequest) (api.Machine, error) {
	var m api.Machine
	return m, c.do(ctx, "POST", "/v1/apps/"+url.PathEscape(app)+"/machines", req, &m)
}

// ListMachines lists an app's machines.
func (c *Client) ListMachines(ctx context.Context, app string) ([]api.Machine, error) {
	var out []api.Machine
	return out, c.do(ctx, "GET", "/v1/apps/"+url.PathEscape(app)+"/machines", nil, &out)
}

// GetMachine gets a machine with its events.
func (c *Client) GetMachine(ctx context.Context, app, id string) (api.Machine, error) {
	var m api.Machine
	return m, c.do(ctx, "GET", mpath(app, id), nil, &m)
}

// Start, Stop and Restart act on a machine.
func (c *Client) Start(ctx context.Context, app, id string) error {
	return c.do(ctx, "POST", mpath(app, id)+"/start", nil, nil)
}

func (c *Client) Stop(ctx context.Context, app, id string) error {
	return c.do(ctx, "POST", mpath(app, id)+"/stop", api.StopRequest{}, nil)
}

func (c *Client) Suspend(ctx context.Context, app, id string) error {
	return c.do(ctx, "POST", mpath(app, id)+"/suspend", nil, nil)
}

func (c *Client) Restart(ctx context.Context, app, id string) error {
	return c.do(ctx, "POST", mpath(app, id)+"/restart", nil, nil)
}

// Destroy destroys a machine; force stops a running one first.
func (c *Client) Destroy(ctx context.Context, app, id string, force bool) error {
	return c.do(ctx, "DELETE", mpath(app, id)+fmt.Sprintf("?force=%t", force), nil, nil)
}

// Wait waits until the machine reaches state.
func (c *Client) Wait(ctx context.Context, app, id, state string, timeout time.Duration) error {
	_, err := c.WaitFor(ctx, app, id, []string{state}, timeout)
	return err
}

// WaitFor waits until the machine reaches one of states (ErrTimeout after timeout, in
// whole seconds from 1 to 300) and says which.
func (c *Client) WaitFor(ctx context.Context, app, id string, states []string, timeout time.Duration) (api.WaitResponse, error) {
	q := url.Values{"state": states, "timeout": {strconv.Itoa(max(1, int(timeout.Seconds())))}}
	var out api.WaitResponse
	return out, c.do(ctx, "GET", mpath(app, id)+"/wait?"+q.Encode(), nil, &out)
}

// Exec runs a command in a started machine and returns its output, at most 1 MiB of
// each stream (Truncated says when there was more). ExecStream has no such limit.
func (c *Client) Exec(ctx context.Context, app, id string, argv []string, stdin string, timeout time.Duration) (api.ExecResponse, error) {
	var out api.ExecResponse
	return out, c.do(ctx, "POST", mpath(app, id)+"/exec", api.ExecRequest{Command: argv, Stdin: stdin, Timeout: int(timeout.Seconds())}, &out)
}

// Events lists a machine's events, newest first.
func (c *Client) Events(ctx context.Context, app, id string) ([]api.Event, error) {
	var out []api.Event
	return out, c.do(ctx, "GET", mpath(app, id)+"/events", nil, &out)
}

// Logs calls fn for each line of the machine's output; with follow it keeps going
// until ctx ends.
func (c *Client) Logs(ctx context.Context, app, id string, follow bool, fn func(api.LogLine) error) error {
	resp, err := c.request(ctx, "GET", mpath(app, id)+fmt.Sprintf("/logs?follow=%t", follow), nil, "")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l api.LogLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return fmt.Errorf("reading logs: %w", err)
		}
		if err := fn(l); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return sc.Err()
}

// LoadImage uploads an image tarball; ref, if set, is an extra name for it.
func (c *Client) LoadImage(ctx context.Context, tarball io.Reader, ref string) (api.ImageLoadResponse, error) {
	var out api.ImageLoadResponse
	q := ""
	if ref != "" {
		q = "?ref=" + url.QueryEscape(ref)
	}
	resp, err := c.request(ctx, "POST", "/v1/images"+q, tarball, "application/x-tar")
	if err != nil {
		return out, err
	}
	defer resp.Body.Close()
	return out, json.NewDecoder(resp.Body).Decode(&out)
}

// FindMachine finds which app a machine ID belongs to.
func (c *Client) FindMachine(ctx context.Context, id string) (string, api.Machine, error) {
	apps, err := c.ListApps(ctx)
	if err != nil {
		return "", api.Machine{}, err
	}
	for _, a := range apps {
		ms, err := c.ListMachines(ctx, a.Name)
		if err != nil {
			continue
		}
		for _, m := range ms {
			if m.ID == id || m.Name == id {
				return a.Name, m, nil
			}
		}
	}
	return "", api.Machine{}, errdefs.New(errdefs.ErrNotFound, "no machine %s in any app: list them with `kiln machine ls --app APP`", id)
}

// CreateVolume creates a named volume: empty, from a snapshot, or a fork of another.
func (c *Client) CreateVolume(ctx context.Context, app string, req api.CreateVolumeRequest) (api.Volume, error) {
	var v api.Volume
	return v, c.do(ctx, "POST", "/v1/apps/"+url.PathEscape(app)+"/volumes", req, &v)
}

// UpdateVolume changes a volume's snapshot settings; nil fields stay as they are.
func (c *Client) UpdateVolume(ctx context.Context, app, id string, req api.UpdateVolumeRequest) (api.Volume, error) {
	var v api.Volume
	return v, c.do(ctx, "PUT", "/v1/apps/"+url.PathEscape(app)+"/volumes/"+url.PathEscape(id), req, &v)
}

// SnapshotVolume takes a snapshot of a volume.
func (c *Client) SnapshotVolume(ctx context.Context, app, id string) (api.Snapshot, error) {
	var sn api.Snapshot
	return sn, c.do(ctx, "POST", "/v1/apps/"+url.PathEscape(app)+"/volumes/"+url.PathEscape(id)+"/snapshots", nil, &sn)
}

// Snapshots lists a volume's snapshots.
func (c *Client) Snapshots(ctx context.Context, app, id string) ([]api.Snapshot, error) {
	var out []api.Snapshot
	return out, c.do(ctx, "GET", "/v1/apps/"+url.PathEscape(app)+"/volumes/"+url.PathEscape(id)+"/snapshots", nil, &out)
}

// ListVolumes lists an app's volumes.
func (c *Client) ListVolumes(ctx context.Context, app string) ([]api.Volume, error) {
	var out []api.Volume
	return out, c.do(ctx, "GET", "/v1/apps/"+url.PathEscape(app)+"/volumes", nil, &out)
}

// ExtendVolume grows a volume.
func (c *Client) ExtendVolume(ctx context.Context, app, id string, sizeGB int) (api.ExtendVolumeResponse, error) {
	var out api.ExtendVolumeResponse
	return out, c.do(ctx, "PUT", "/v1/apps/"+url.PathEscape(app)+"/volumes/"+url.PathEscape(id)+"/extend", api.ExtendVolumeRequest{SizeGB: sizeGB}, &out)
}

// DeleteVolume destroys a volume no machine holds.
func (c *Client) DeleteVolume(ctx context.Context, app, id string) error {
	return c.do(ctx, "DELETE", "/v1/apps/"+url.PathEscape(app)+"/volumes/"+url.PathEscape(id), nil, nil)
}

// Limits lists every limit the server enforces.
func (c *Client) Limits(ctx context.Context) ([]api.Limit, error) {
	var out []api.Limit
	return out, c.do(ctx, "GET", "/v1/limits", nil, &out)
}

// Hosts lists the hosts with their capacity.
func (c *Client) Hosts(ctx context.Context) ([]api.Host, error) {
	var out []api.Host
	return out, c.do(ctx, "GET", "/v1/hosts", nil, &out)
}

// CordonHost stops (or with false, resumes) placing new work on a host.
func (c *Client) CordonHost(ctx context.Context, host string, cordon bool) error {
	op := "/uncordon"
	if cordon {
		op = "/cordon"
	}
	return c.do(ctx, "POST", "/v1/hosts/"+url.PathEscape(host)+op, nil, nil)
}

// DrainHost cordons a host and moves what it can of its machines to other hosts.
func (c *Client) DrainHost(ctx context.Context, host string) (api.DrainReport, error) {
	var out api.DrainReport
	return out, c.do(ctx, "POST", "/v1/hosts/"+url.PathEscape(host)+"/drain", nil, &out)
}
