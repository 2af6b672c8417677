package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/auth/authtest"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/prometheus/client_golang/prometheus"
)

// Attacks on what issue 16 added (metrics, the event stream, request ids, the console),
// by a tenant holding a token of its own.

// watchedJournal is the real journal, telling reads on behalf of a scoped token (the
// only ones with a reach) to reads.
type watchedJournal struct {
	*sqlstore.DB
	reads chan store.EventFilter
}

func (j watchedJournal) ListEvents(ctx context.Context, f store.EventFilter) ([]store.Event, error) {
	if f.Apps != nil {
		select {
		case j.reads <- f:
		default:
		}
	}
	return j.DB.ListEvents(ctx, f)
}

// A follower whose filter matches none of what others write must not read all of it
// again at every poll and every write: a tenant following its quiet app (the console
// does for every open tab) while other tenants' machines churn would otherwise have the
// store scan the whole journal since its app's last event several times a second, per
// follow. Its reads resume after the journal's head, and it still gets its own events.
func TestEventFollowerSkipsWhatItCannotSee(t *testing.T) {
	ctx := context.Background()
	db, err := sqlstore.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	for _, app := range []string{"a", "b"} {
		db.CreateApp(ctx, app)
		db.CreateMachine(ctx, store.Machine{ID: "m-" + app, App: app, Name: "m-" + app, State: machine.Created, Config: []byte(`{"image":"x"}`)}, machine.Event{Type: "launch", Source: "user"})
	}
	ms := machines.New(machines.Config{Store: db, Dir: t.TempDir()})
	j := watchedJournal{DB: db, reads: make(chan store.EventFilter, 1000)}
	srv := httptest.NewServer((&server.Server{Store: db, Node: ms, Auth: &auth.Checker{Key: authtest.Key, Tokens: db}, Access: db, Events: j}).Handler())
	t.Cleanup(func() { srv.Close(); ms.Close() })
	tn := &tenants{t: t, url: srv.URL, db: db}

	tok := tn.token(api.CreateTokenRequest{Apps: []string{"a"}, Projects: []string{"pa"}, Role: "read"}).Token
	s := tn.follow("", tok)
	if e := s.next(); e.data.MachineID != "m-a" {
		t.Fatalf("a's stream starts with %+v", e)
	}
	for i := range 50 {
		if err := db.Note(ctx, "m-b", machine.Event{Type: "capacity", Source: "kiln", Message: fmt.Sprint("b's churn ", i)}); err != nil {
			t.Fatal(err)
		}
	}
	var list api.EventList
	if _, body := tn.call("GET", "/v1/events?limit=1", opToken, nil); json.Unmarshal(body, &list) != nil || list.Next == 0 {
		t.Fatalf("the journal's head: %s", body)
	}
	for deadline := time.After(10 * time.Second); ; {
		select {
		case f := <-j.reads:
			if f.After < list.Next {
				continue
			}
		case <-deadline:
			t.Fatalf("a's follower still reads from before b's %d events: it scans them at every poll", 50)
		}
		break
	}
	if err := db.Transition(ctx, "m-a", machine.Created, machine.Starting, machine.Event{Type: "start", Source: "user"}); err != nil {
		t.Fatal(err)
	}
	if e := s.next(); says(e.data) != "machine.start a m-a starting" {
		t.Errorf("a's own event after the skip: %+v", e)
	}
	// Skipping to the head never skips an event: a follow resuming after 0 a page of
	// one at a time still gets every one, in order.
	all := tn.follow("&after=0&limit=1", opToken)
	for want := int64(1); want <= list.Next+1; want++ {
		if e := all.next(); e.data.ID != want {
			t.Fatalf("resuming after 0, event %d is %+v", want, e.data)
		}
	}
}

// stateReads counts how often a scrape made the host read its state.
type stateReads struct{ n atomic.Int64 }

var stateDesc = prometheus.NewDesc("t_state", "", []string{metrics.LabelApp}, nil)

func (c *stateReads) Describe(ch chan<- *prometheus.Desc) { ch <- stateDesc }
func (c *stateReads) Collect(ch chan<- prometheus.Metric) {
	c.n.Add(1)
	ch <- prometheus.MustNewConstMetric(stateDesc, prometheus.GaugeValue, 1, "a")
}

// An app's token scraping /metrics in a loop makes the host read its state (every
// machine's cgroup and TAP counters) once a second at most, not once a scrape; the
// operator's scrapes read it each time.
func TestTenantScrapesShareOneGather(t *testing.T) {
	reads := &stateReads{}
	chk, op := authtest.Operator()
	srv := httptest.NewServer((&server.Server{Auth: chk, Metrics: metrics.NewRegistry(reads)}).Handler())
	defer srv.Close()
	tok := authtest.Issue(chk, "tok_a", auth.RoleCaveat(auth.Read), auth.ScopeCaveat(auth.App("a")))
	start := time.Now()
	for range 20 {
		if code, body := scrape(t, srv.URL, tok); code != 200 || !strings.Contains(body, `t_state{app="a"} 1`) {
			t.Fatalf("a's scrape: %d %s", code, body)
		}
	}
	if n := reads.n.Load(); n > int64(time.Since(start)/time.Second)+1 {
		t.Errorf("20 scrapes by a's token read the host's state %d times", n)
	}
	before := reads.n.Load()
	for range 3 {
		scrape(t, srv.URL, op)
	}
	if n := reads.n.Load() - before; n != 3 {
		t.Errorf("3 scrapes by the operator read the host's state %d times", n)
	}
}
