package client

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"mime/multipart"
	"net/url"
	"sort"
	"strings"
	"sync"

	"github.com/kilnhq/kiln/api"
)

func bpath(project string) string { return "/v1/projects/" + url.PathEscape(project) + "/builds" }

// SubmitBuild queues a build: the spec, the secrets (sent once, never stored by the
// server) and the context as a tar stream, streamed as it is read. When reading
// contextTar fails, that error is returned: it ends the upload, which would otherwise be
// reported as a server that cannot be reached.
func (c *Client) SubmitBuild(ctx context.Context, project string, spec api.BuildSpec, contextTar io.Reader, secrets map[string][]byte) (api.Build, error) {
	pr, pw := io.Pipe()
	src := &errReader{r: contextTar}
	mw := multipart.NewWriter(pw)
	go func() {
		err := func() error {
			w, err := mw.CreateFormField("spec")
			if err != nil {
				return err
			}
			if err := json.NewEncoder(w).Encode(spec); err != nil {
				return err
			}
			ids := make([]string, 0, len(secrets))
			for id := range secrets {
				ids = append(ids, id)
			}
			sort.Strings(ids)
			for _, id := range ids {
				w, err := mw.CreateFormField("secret:" + id)
				if err != nil {
					return err
				}
				if _, err := w.Write(secrets[id]); err != nil {
					return err
				}
			}
			w, err = mw.CreateFormFile("context", "context.tar")
			if err != nil {
				return err
			}
			if _, err := io.Copy(w, src); err != nil {
				return err
			}
			return mw.Close()
		}()
		pw.CloseWithError(err)
	}()
	var b api.Build
	resp, err := c.request(ctx, "POST", bpath(project), pr, mw.FormDataContentType())
	pr.Close()
	if rerr := src.failed(); rerr != nil {
		if resp != nil {
			resp.Body.Close()
		}
		return b, rerr
	}
	if err != nil {
		return b, err
	}
	defer resp.Body.Close()
	return b, json.NewDecoder(resp.Body).Decode(&b)
}

// errReader remembers the first error other than io.EOF that reading r gave.
type errReader struct {
	r   io.Reader
	mu  sync.Mutex
	err error
}

func (e *errReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && err != io.EOF {
		e.mu.Lock()
		if e.err == nil {
			e.err = err
		}
		e.mu.Unlock()
	}
	return n, err
}

func (e *errReader) failed() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

// ListBuilds lists a project's builds, newest first.
func (c *Client) ListBuilds(ctx context.Context, project string) ([]api.Build, error) {
	var out []api.Build
	return out, c.do(ctx, "GET", bpath(project), nil, &out)
}

// GetBuild returns a build.
func (c *Client) GetBuild(ctx context.Context, project, id string) (api.Build, error) {
	var b api.Build
	return b, c.do(ctx, "GET", bpath(project)+"/"+url.PathEscape(id), nil, &b)
}

// CancelBuild cancels a queued or running build.
func (c *Client) CancelBuild(ctx context.Context, project, id string) error {
	return c.do(ctx, "POST", bpath(project)+"/"+url.PathEscape(id)+"/cancel", nil, nil)
}

// BuildLogs reads a build's log (server-sent events), calling fn for each line; with
// follow it waits for the build to end. It returns the build as it ended (or is now).
func (c *Client) BuildLogs(ctx context.Context, project, id string, follow bool, fn func(line string)) (api.Build, error) {
	var b api.Build
	q := "?follow=false"
	if follow {
		q = "?follow=true"
	}
	resp, err := c.request(ctx, "GET", bpath(project)+"/"+url.PathEscape(id)+"/logs"+q, nil, "")
	if err != nil {
		return b, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	event := ""
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "event: "):
			event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: ") || line == "data:":
			data := strings.TrimPrefix(strings.TrimPrefix(line, "data:"), " ")
			if event == "end" {
				return b, json.Unmarshal([]byte(data), &b)
			}
			fn(data)
		}
	}
	if err := sc.Err(); err != nil {
		return b, err
	}
	return c.GetBuild(ctx, project, id)
}

// BuildCache describes a project's build cache.
func (c *Client) BuildCache(ctx context.Context, project string) (api.BuildCache, error) {
	var out api.BuildCache
	return out, c.do(ctx, "GET", "/v1/projects/"+url.PathEscape(project)+"/cache", nil, &out)
}

// PruneBuildCache empties a project's build cache.
func (c *Client) PruneBuildCache(ctx context.Context, project string) (api.PruneResponse, error) {
	var out api.PruneResponse
	return out, c.do(ctx, "POST", "/v1/projects/"+url.PathEscape(project)+"/cache/prune", nil, &out)
}

// RemoveBuilder removes a project's builder VM; its cache stays.
func (c *Client) RemoveBuilder(ctx context.Context, project string) error {
	return c.do(ctx, "DELETE", "/v1/projects/"+url.PathEscape(project)+"/builder", nil, nil)
}
