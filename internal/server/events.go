package server

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

const (
	// defaultEventLimit is how many events GET /v1/events returns (or a follow starts
	// with) unless limit says otherwise.
	defaultEventLimit = 100
	// maxEventTypes bounds the types one call filters on.
	maxEventTypes = 32
	// MaxEventFollowers and MaxEventFollowersPerToken bound the open follows of the event
	// stream, in all and per token: each polls the store while it is open.
	MaxEventFollowers         = 256
	MaxEventFollowersPerToken = 16
)

var (
	// eventPoll is how often a follower reads the journal: what other hosts sharing
	// the database write reaches it at this pace; this process's own writes wake it.
	eventPoll = 250 * time.Millisecond
	// eventCoalesce gathers a burst of writes into one read.
	eventCoalesce = 20 * time.Millisecond
	// eventKeepalive is how often a follow sends a comment, so that proxies and clients
	// see a quiet stream is alive.
	eventKeepalive = 15 * time.Second
	// eventRecheck is how often a follow checks its token again.
	eventRecheck = time.Second
)

// listEvents serves the journal of events: the newest, or with follow=true a stream of
// server-sent events that goes on as events happen. The caller's token decides what it
// sees: the operator everything, a scoped token its apps' machines and its projects'
// builds.
func (s *Server) listEvents(w http.ResponseWriter, r *http.Request) error {
	if s.Events == nil {
		return errdefs.New(errdefs.ErrNotImplemented, "this server keeps no event journal")
	}
	id, _ := auth.From(r.Context())
	f, err := eventFilter(r, id)
	if err != nil {
		return err
	}
	if r.URL.Query().Get("follow") != "true" {
		es, err := s.Events.ListEvents(r.Context(), f)
		if err != nil {
			return err
		}
		out := api.EventList{Events: []api.StreamEvent{}, Next: f.After}
		for _, e := range es {
			out.Events = append(out.Events, api.StreamEvent(e))
			out.Next = e.ID
		}
		writeJSON(w, http.StatusOK, out)
		return nil
	}
	release, err := s.followers.take(id.TokenID)
	if err != nil {
		return err
	}
	defer release()
	return s.followEvents(w, r, f)
}

// eventFilter reads a call's filters, limited to what id reaches. A filter naming an app
// or project out of its reach is not found, as everywhere in the API.
func eventFilter(r *http.Request, id auth.Identity) (store.EventFilter, error) {
	q := r.URL.Query()
	f := store.EventFilter{App: q.Get("app"), Machine: q.Get("machine"), Project: q.Get("project"), Build: q.Get("build"),
		Newest: true, Limit: defaultEventLimit}
	for t := range strings.SplitSeq(q.Get("type"), ",") {
		if t = strings.TrimSpace(t); t != "" {
			f.Types = append(f.Types, t)
		}
	}
	if len(f.Types) > maxEventTypes {
		return f, errdefs.Invalid("type= names %d types: at most %d", len(f.Types), maxEventTypes)
	}
	// A browser reconnecting sends the last ID it saw in the header, and the URL it
	// first opened, whose after= is older.
	for _, v := range []string{q.Get("after"), r.Header.Get("Last-Event-ID")} {
		if v == "" {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return f, errdefs.Invalid("after=%q: want the id of an event (a whole number from 0)", v)
		}
		f.After, f.Newest = max(f.After, n), false
	}
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > store.MaxEventPage {
			return f, errdefs.Invalid("limit=%q: want a whole number of events from 1 to %d", l, store.MaxEventPage)
		}
		f.Limit = n
	}
	if f.App != "" {
		if machine.InternalApp(f.App) {
			return f, errdefs.New(errdefs.ErrNotFound, "app %s not found: list apps with `kiln app ls`", f.App)
		}
		if err := mayOn(id, auth.App(f.App), auth.Read); err != nil {
			return f, err
		}
	}
	if f.Project != "" {
		if err := mayOn(id, auth.Project(f.Project), auth.Read); err != nil {
			return f, err
		}
	}
	if id.Limited {
		f.Apps, f.Projects = []string{}, []string{}
		for _, res := range id.Scope {
			if res.Kind == "app" {
				f.Apps = append(f.Apps, res.Name)
			} else {
				f.Projects = append(f.Projects, res.Name)
			}
		}
	}
	return f, nil
}

// followEvents streams the events f selects as server-sent events until the caller goes:
// first those the call asked for (the newest, or those after its after=), then each as
// it is written.
func (s *Server) followEvents(w http.ResponseWriter, r *http.Request, f store.EventFilter) error {
	ctx := r.Context()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Accel-Buffering", "no") // a proxy in front must not hold events back
	w.WriteHeader(http.StatusOK)
	fl, _ := w.(http.Flusher)
	flush := func() {
		if fl != nil {
			fl.Flush()
		}
	}
	flush()
	ended := s.followers.endedCh()
	keepalive := time.NewTicker(eventKeepalive)
	defer keepalive.Stop()
	poll := time.NewTimer(eventPoll)
	defer poll.Stop()
	checked := time.Now()
	for {
		// A follow has no end of its own: the token it was opened with is checked again
		// (its record at most auth.Recheck old), so a revoked or expired token stops
		// receiving events; the client's reconnect is then refused with the reason.
		if time.Since(checked) >= eventRecheck {
			if _, err := s.identify(r); err != nil {
				return nil
			}
			checked = time.Now()
		}
		// Taken before the read, so that a write between the read and the wait wakes it.
		woke := s.Events.EventsWritten()
		// The journal's newest id, read before f's read: seqs become visible in order, so
		// f's read sees everything up to it, and a follower whose filter or reach matched
		// none of it resumes after it instead of scanning it again at every poll and
		// every write (a tenant following a quiet app while others' machines churn).
		head, err := s.Events.ListEvents(ctx, store.EventFilter{Newest: true, Limit: 1})
		var es []store.Event
		if err == nil {
			es, err = s.Events.ListEvents(ctx, f)
		}
		if err != nil {
			if ctx.Err() == nil {
				s.logf(ctx)("events: reading the journal for a follower: %v", err)
			}
			return nil // the client reconnects with the last id it saw
		}
		for _, e := range es {
			data, _ := json.Marshal(api.StreamEvent(e))
			if _, err := fmt.Fprintf(w, "id: %d\nevent: %s\ndata: %s\n\n", e.ID, sseField(e.Type), data); err != nil {
				return nil
			}
			f.After = e.ID
		}
		more := !f.Newest && len(es) == f.Limit
		f.Newest, f.Limit = false, store.MaxEventPage
		flush()
		if more {
			continue // more is waiting
		}
		if len(head) > 0 {
			f.After = max(f.After, head[0].ID)
		}
		poll.Reset(eventPoll)
		select {
		case <-ctx.Done():
			return nil
		case <-ended:
			return nil
		case <-woke:
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(eventCoalesce):
			}
		case <-poll.C:
		case <-keepalive.C:
			if _, err := fmt.Fprint(w, ": keepalive\n\n"); err != nil {
				return nil
			}
			flush()
		}
	}
}

// sseField keeps a value on its line of a server-sent event.
func sseField(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '\n' || r == '\r' {
			return -1
		}
		return r
	}, s)
}

// followers counts the open follows of the event stream, in all and per token.
type followers struct {
	mu      sync.Mutex
	n       int
	byToken map[string]int
	ended   chan struct{} // closed by EndStreams
}

// EndStreams ends the open follows of the event stream and refuses new ones: a server
// shutting down calls it (http.Server.RegisterOnShutdown), as its graceful shutdown
// would otherwise wait for streams that never finish. Followers reconnect elsewhere or
// after the restart, resuming where they were.
func (s *Server) EndStreams() {
	ch := s.followers.endedCh()
	s.followers.mu.Lock()
	defer s.followers.mu.Unlock()
	select {
	case <-ch:
	default:
		close(ch)
	}
}

func (f *followers) endedCh() chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ended == nil {
		f.ended = make(chan struct{})
	}
	return f.ended
}

// take counts one more follow by token, if both bounds allow it; release uncounts it.
func (f *followers) take(token string) (release func(), err error) {
	ended := f.endedCh()
	f.mu.Lock()
	defer f.mu.Unlock()
	select {
	case <-ended:
		return nil, errdefs.New(errdefs.ErrUnavailable, "the server is shutting down: follow the events again in a moment")
	default:
	}
	if f.n >= MaxEventFollowers {
		return nil, errdefs.New(errdefs.ErrUnavailable, "the server already streams events to %d followers, its limit (events.followers): retry later", MaxEventFollowers)
	}
	if f.byToken[token] >= MaxEventFollowersPerToken {
		return nil, errdefs.New(errdefs.ErrUnavailable, "token %s already follows the event stream %d times, its limit (events.followers_per_token): close one", token, MaxEventFollowersPerToken)
	}
	if f.byToken == nil {
		f.byToken = map[string]int{}
	}
	f.n++
	f.byToken[token]++
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.n--
		if f.byToken[token]--; f.byToken[token] == 0 {
			delete(f.byToken, token)
		}
	}, nil
}
