package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/auth/authtest"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
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
