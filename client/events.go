package client

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/kilnhq/kiln/api"
)

// EventQuery selects events of GET /v1/events; every field set narrows them.
type EventQuery struct {
	App, Machine, Project, Build string
	Types                        []string
	// After skips the events up to this ID (0: the newest Limit instead).
	After int64
	// Limit is how many events (the server's default if 0).
	Limit int
}

func (q EventQuery) values() url.Values {
	v := url.Values{}
	for k, s := range map[string]string{"app": q.App, "machine": q.Machine, "project": q.Project, "build": q.Build, "type": strings.Join(q.Types, ",")} {
		if s != "" {
			v.Set(k, s)
		}
	}
	if q.After > 0 {
		v.Set("after", strconv.FormatInt(q.After, 10))
	}
	if q.Limit > 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	return v
}

// ListEvents lists the events q selects, oldest first, with the ID to resume after.
func (c *Client) ListEvents(ctx context.Context, q EventQuery) (api.EventList, error) {
	var out api.EventList
	return out, c.do(ctx, "GET", "/v1/events?"+q.values().Encode(), nil, &out)
}

// followSilence is how long a follow waits without a byte, keepalives included (the
// server sends one every 15 s), before it takes the connection for dead.
var followSilence = 45 * time.Second

// FollowEvents calls fn for each event q selects, as the server streams them, until ctx
// ends (then it returns nil) or fn fails. When the connection drops or the server stops
// answering, it says so to dropped (if set) and connects again, resuming after the last
// event it passed on; a refusal (a bad filter, a token that does not reach the app) ends
// it with the server's error.
func (c *Client) FollowEvents(ctx context.Context, q EventQuery, fn func(api.StreamEvent) error, dropped func(error)) error {
	wait := 500 * time.Millisecond
	for {
		got, err := c.followOnce(ctx, &q, fn)
		if ctx.Err() != nil {
			return nil
		}
		var refused *Error
		var failed fnError
		switch {
		case errors.As(err, &failed):
			return failed.err
		case errors.As(err, &refused) && refused.Status < 500:
			return err
		case err == nil:
			err = errors.New("the server ended the stream")
		}
		if got {
			wait = 500 * time.Millisecond
		}
		if dropped != nil {
			dropped(err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		wait = min(2*wait, 10*time.Second)
	}
}

// fnError carries the caller's own error out of a stream.
type fnError struct{ err error }

func (e fnError) Error() string { return e.err.Error() }

// followOnce follows one connection, moving q.After on with each event; it says whether
// the server answered.
func (c *Client) followOnce(ctx context.Context, q *EventQuery, fn func(api.StreamEvent) error) (bool, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	v := q.values()
	v.Set("follow", "true")
	resp, err := c.request(ctx, "GET", "/v1/events?"+v.Encode(), nil, "")
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	silent := time.AfterFunc(followSilence, func() {
		cancel(fmt.Errorf("nothing from the server for %s", followSilence))
	})
	defer silent.Stop()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var data string
	for sc.Scan() {
		silent.Reset(followSilence)
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "data:"):
			data = strings.TrimPrefix(strings.TrimPrefix(line, "data:"), " ")
		case line == "" && data != "":
			var e api.StreamEvent
			if err := json.Unmarshal([]byte(data), &e); err != nil {
				return true, fmt.Errorf("reading the event stream: %w", err)
			}
			data = ""
			if err := fn(e); err != nil {
				return true, fnError{err}
			}
			q.After = e.ID
		}
		// id: and event: repeat what data carries; comments keep the connection alive.
	}
	if err := context.Cause(ctx); err != nil {
		return true, err
	}
	return true, sc.Err()
}
