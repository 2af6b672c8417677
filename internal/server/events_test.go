package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// sseEvent is one server-sent event as it came: its fields, or a comment.
type sseEvent struct {
	id, event, comment string
	data               api.StreamEvent
}

// stream is an open GET /v1/events?follow=true.
type stream struct {
	t      *testing.T
	resp   *http.Response
	events chan sseEvent
}

// follow opens the event stream with query q (and extra headers) as token.
func (tn *tenants) follow(q, token string, header ...string) *stream {
	tn.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", tn.url+"/v1/events?follow=true"+q, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tn.t.Fatal(err)
	}
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		tn.t.Fatalf("follow %s: %d %s", q, resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	s := &stream{t: tn.t, resp: resp, events: make(chan sseEvent, 100)}
	tn.t.Cleanup(func() { cancel(); resp.Body.Close() })
	go s.read()
	return s
}

// read parses the stream exactly as the contract words it: "id: N", "event: TYPE" and
// "data: JSON" lines ending with a blank line, or a ": comment" line and a blank line.
func (s *stream) read() {
	defer close(s.events)
	sc := bufio.NewScanner(s.resp.Body)
	var ev sseEvent
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			s.events <- ev
			ev = sseEvent{}
		case strings.HasPrefix(line, ": "):
			ev.comment = strings.TrimPrefix(line, ": ")
		case strings.HasPrefix(line, "id: "):
			ev.id = strings.TrimPrefix(line, "id: ")
		case strings.HasPrefix(line, "event: "):
			ev.event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &ev.data); err != nil {
				s.t.Errorf("data line %q: %v", line, err)
			}
		default:
			s.t.Errorf("a line the contract does not have: %q", line)
		}
	}
}

// next waits for the next event (keepalives skipped) and checks its fields agree.
func (s *stream) next() sseEvent {
	s.t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-s.events:
			if !ok {
				s.t.Fatal("the stream ended")
			}
			if ev.comment != "" {
				continue
			}
			if ev.id != fmt.Sprint(ev.data.ID) || ev.event != ev.data.Type || ev.data.Time.IsZero() {
				s.t.Errorf("event fields disagree: %+v", ev)
			}
			return ev
		case <-timeout:
			s.t.Fatal("no event within 10 s")
		}
	}
}

// says is an event in a line: type, app or project, machine or build, state.
func says(e api.StreamEvent) string {
	return strings.Join(strings.Fields(strings.Join([]string{e.Type, e.App, e.Project, e.MachineID, e.BuildID, e.State}, " ")), " ")
}

// A follower sees the journal's newest events, then each change the store makes as it
// happens, in the contract's format, with keepalives; resuming after an id, by after= or
// Last-Event-ID, gives only what came later; the list answers the same events with the
// id to resume after.
func TestEventStreamFollowsChanges(t *testing.T) {
	defer server.SetEventKeepalive(50 * time.Millisecond)()
	tn := newTenants(t)
	ctx := context.Background()
	s := tn.follow("", opToken)
	first, second := s.next(), s.next()
	if says(first.data) != "machine.launch a m-a created" || says(second.data) != "machine.launch b m-b created" {
		t.Fatalf("the stream starts with %q, %q", says(first.data), says(second.data))
	}
	if err := tn.db.Transition(ctx, "m-a", machine.Created, machine.Starting, machine.Event{Type: "start", Source: "user"}); err != nil {
		t.Fatal(err)
	}
	start := s.next()
	if says(start.data) != "machine.start a m-a starting" || start.data.ID <= second.data.ID {
		t.Errorf("after a start: %+v", start)
	}
	now := time.Now()
	if err := tn.db.CreateBuild(ctx, store.Build{ID: "b1", Project: "pa", State: "queued", Spec: []byte(`{}`), NotBefore: now, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
	if e := s.next(); says(e.data) != "build.queued pa b1 queued" {
		t.Errorf("after a build: %+v", e)
	}
	sawKeepalive := false
	for deadline := time.After(5 * time.Second); !sawKeepalive; {
		select {
		case ev := <-s.events:
			sawKeepalive = ev.comment == "keepalive" && ev.id == "" && ev.event == ""
		case <-deadline:
			t.Fatal("no keepalive")
		}
	}

	for _, resume := range []*stream{tn.follow(fmt.Sprintf("&after=%d", second.data.ID), opToken),
		tn.follow("&after=1", opToken, "Last-Event-ID", fmt.Sprint(second.data.ID))} {
		if e := resume.next(); e.data.ID != start.data.ID {
			t.Errorf("resumed after %d, the first event is %+v", second.data.ID, e)
		}
	}

	var list api.EventList
	code, body := tn.call("GET", "/v1/events", opToken, nil)
	if code != 200 || json.Unmarshal(body, &list) != nil || len(list.Events) != 4 || list.Next != list.Events[3].ID || says(list.Events[3]) != "build.queued pa b1 queued" {
		t.Errorf("the list: %d %s", code, body)
	}
	code, body = tn.call("GET", "/v1/events?limit=1&type=machine.launch,machine.start", opToken, nil)
	if json.Unmarshal(body, &list) != nil || len(list.Events) != 1 || list.Events[0].ID != start.data.ID {
		t.Errorf("the newest machine.launch or machine.start: %d %s", code, body)
	}
	code, body = tn.call("GET", fmt.Sprintf("/v1/events?after=%d", list.Next+1000), opToken, nil)
	if json.Unmarshal(body, &list) != nil || len(list.Events) != 0 || list.Next != start.data.ID+1000 || !strings.Contains(string(body), `"events":[]`) {
		t.Errorf("nothing after: %d %s", code, body)
	}
	for _, q := range []string{"after=-1", "after=x", "limit=0", "limit=1001", "type=" + strings.Repeat("a,", 40)} {
		if code, body := tn.call("GET", "/v1/events?"+q, opToken, nil); code != http.StatusBadRequest {
			t.Errorf("?%s: %d %s", q, code, body)
		}
	}
}

// A token scoped to app a and project pa sees a's machine events and pa's builds, never
// b's, in the list and the stream; naming b (or pb, or kiln's own builders) is not
// found.
func TestEventStreamShowsOnlyWhatTheTokenReaches(t *testing.T) {
	tn := newTenants(t)
	ctx := context.Background()
	tok := tn.token(api.CreateTokenRequest{Apps: []string{"a"}, Projects: []string{"pa"}, Role: "read"}).Token
	now := time.Now()
	for _, p := range []string{"pa", "pb"} {
		tn.db.CreateBuild(ctx, store.Build{ID: "b-" + p, Project: p, State: "queued", Spec: []byte(`{}`), NotBefore: now, CreatedAt: now, UpdatedAt: now})
	}
	code, body := tn.call("GET", "/v1/events", tok, nil)
	var list api.EventList
	if json.Unmarshal(body, &list) != nil || len(list.Events) != 2 || says(list.Events[0]) != "machine.launch a m-a created" || says(list.Events[1]) != "build.queued pa b-pa queued" {
		t.Errorf("a's list: %d %s", code, body)
	}
	for _, q := range []string{"app=b", "project=pb", "app=_builders", "follow=true&app=b"} {
		if code, body := tn.call("GET", "/v1/events?"+q, tok, nil); code != http.StatusNotFound || strings.Contains(string(body), "m-b") {
			t.Errorf("?%s with a's token: %d %s", q, code, body)
		}
	}
	if code, body := tn.call("GET", "/v1/events?machine=m-b", tok, nil); code != 200 || strings.Contains(string(body), "m-b") {
		t.Errorf("?machine=m-b with a's token: %d %s", code, body)
	}
	s := tn.follow(fmt.Sprintf("&after=%d", list.Next), tok)
	tn.db.Transition(ctx, "m-b", machine.Created, machine.Starting, machine.Event{Type: "start", Source: "user"})
	tn.db.UpdateBuild(ctx, store.Build{ID: "b-pb", Project: "pb", State: "running", Attempt: 1}, store.BuildRev{State: "queued"})
	tn.db.Transition(ctx, "m-a", machine.Created, machine.Starting, machine.Event{Type: "start", Source: "user"})
	if e := s.next(); says(e.data) != "machine.start a m-a starting" {
		t.Errorf("a's stream, after b's and pb's changes and then a's: %+v", e)
	}
}

// A token follows the stream at most MaxEventFollowersPerToken times at once; past it
// the answer says so, and a closed follow frees its place.
func TestEventFollowersAreBounded(t *testing.T) {
	tn := newTenants(t)
	var open []*stream
	for range server.MaxEventFollowersPerToken {
		open = append(open, tn.follow("", opToken))
	}
	// One more follow: its answer's status and the start of its body, within 5 s.
	try := func() (int, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "GET", tn.url+"/v1/events?follow=true", nil)
		req.Header.Set("Authorization", "Bearer "+opToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode == 200 {
			return 200, ""
		}
		b := make([]byte, 512)
		n, _ := resp.Body.Read(b)
		return resp.StatusCode, string(b[:n])
	}
	if code, body := try(); code != http.StatusServiceUnavailable || !strings.Contains(body, "events.followers_per_token") {
		t.Fatalf("one follow too many: %d %s", code, body)
	}
	open[0].resp.Body.Close()
	for deadline := time.Now().Add(10 * time.Second); ; {
		code, body := try()
		if code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a closed follow did not free its place: %d %s", code, body)
		}
		time.Sleep(20 * time.Millisecond) // the server notices the close on its next read
	}
}

// A server shutting down ends its follows (a graceful shutdown would wait for them for
// ever) and takes no new ones.
func TestEndStreamsEndsFollows(t *testing.T) {
	db, err := sqlstore.Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	apiSrv := &server.Server{Auth: opAuth, Events: db}
	srv := httptest.NewServer(apiSrv.Handler())
	defer srv.Close()
	tn := &tenants{t: t, url: srv.URL, db: db}
	s := tn.follow("", opToken)
	apiSrv.EndStreams()
	select {
	case _, open := <-s.events:
		if open {
			t.Error("an event after EndStreams")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the follow is still open 10 s after EndStreams")
	}
	if code, body := tn.call("GET", "/v1/events?follow=true", opToken, nil); code != http.StatusServiceUnavailable {
		t.Errorf("a follow after EndStreams: %d %s", code, body)
	}
}

// A follow opened with a token ends once the token is revoked: it has no end of its own.
func TestRevokedTokenEndsItsFollow(t *testing.T) {
	tn := newTenants(t)
	tok := tn.token(api.CreateTokenRequest{Apps: []string{"a"}, Role: "read"})
	s := tn.follow("", tok.Token)
	if code, body := tn.call("DELETE", "/v1/tokens/"+tok.ID, opToken, nil); code/100 != 2 {
		t.Fatalf("revoke: %d %s", code, body)
	}
	timeout := time.After(10 * time.Second)
	for {
		select {
		case _, ok := <-s.events:
			if !ok {
				return // ended
			}
		case <-timeout:
			t.Fatal("the follow of a revoked token still runs 10 s later")
		}
	}
}
