package sqlstore_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

func TestEventJournal(t *testing.T) { forEachDialect(t, testEventJournal) }

// Every machine event and every change of a build's state is in the journal, with its
// app or project and host, in the order it happened; a refused change and a result-only
// update of a build add nothing; kiln's own builders are left out; the filters, a
// scoped reach, resuming after a seq, the tail and retention select what they say.
func testEventJournal(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	woke := db.EventsWritten()
	for _, app := range []string{"web", "api", "_builders"} {
		db.CreateApp(ctx, app)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(db.CreateMachine(ctx, store.Machine{ID: "m1", App: "web", Name: "a", State: machine.Created, Config: []byte(`{}`), Host: "h1"}, machine.Event{Type: "launch", Source: "user"}))
	select {
	case <-woke:
	default:
		t.Error("EventsWritten was not closed by a machine's creation")
	}
	must(db.CreateMachine(ctx, store.Machine{ID: "m2", App: "api", Name: "b", State: machine.Created, Config: []byte(`{}`)}, machine.Event{Type: "launch", Source: "user"}))
	must(db.CreateMachine(ctx, store.Machine{ID: "bk", App: "_builders", Name: "bk", State: machine.Created, Config: []byte(`{}`)}, machine.Event{Type: "launch", Source: "kiln"}))
	must(db.Transition(ctx, "bk", machine.Created, machine.Starting, machine.Event{Type: "start", Source: "kiln"}))
	must(db.Transition(ctx, "m1", machine.Created, machine.Starting, machine.Event{Type: "start", Source: "user"}))
	if err := db.Transition(ctx, "m1", machine.Created, machine.Starting, machine.Event{Type: "start", Source: "user"}); err == nil {
		t.Fatal("a stale transition passed")
	}
	must(db.Transition(ctx, "m1", machine.Starting, machine.Started, machine.Event{Type: "start", Source: "kiln"}))
	must(db.Note(ctx, "m1", machine.Event{Type: "capacity", Source: "kiln", Message: "waiting for room"}))
	code := 3
	must(db.Transition(ctx, "m1", machine.Started, machine.Stopping, machine.Event{Type: "exit", Source: "kiln", ExitCode: &code, Message: strings.Repeat("x", 5000)}))
	must(db.Transition(ctx, "m1", machine.Stopping, machine.Stopped, machine.Event{Type: "stop", Source: "kiln"}))
	m, _ := db.GetMachine(ctx, "m1")
	must(db.UpdateConfig(ctx, "m1", m.Version, []byte(`{"image":"y"}`)))

	now := time.Now().UTC()
	b := store.Build{ID: "b1", Project: "shop", State: "queued", Spec: []byte(`{}`), NotBefore: now, CreatedAt: now, UpdatedAt: now}
	must(db.CreateBuild(ctx, b))
	run := b
	run.State, run.Attempt, run.Host = "running", 1, "h2"
	must(db.UpdateBuild(ctx, run, b.Rev()))
	result := run
	result.Result = []byte(`{"cached_steps":1}`)
	must(db.UpdateBuild(ctx, result, run.Rev())) // no new state: no event
	failed := result
	failed.State, failed.Result = "failed", []byte(`{"error":"step 2: exit 1"}`)
	must(db.UpdateBuild(ctx, failed, result.Rev()))

	all, err := db.ListEvents(ctx, store.EventFilter{})
	must(err)
	var got []string
	for i, e := range all {
		got = append(got, strings.Join([]string{e.Type, e.App + e.Project, e.MachineID + e.BuildID, e.Host, e.State}, " "))
		if i > 0 && e.ID <= all[i-1].ID || e.Time.IsZero() {
			t.Errorf("event %d: seq %d after %d, time %v", i, e.ID, all[i-1].ID, e.Time)
		}
	}
	want := []string{
		"machine.launch web m1 h1 created",
		"machine.launch api m2  created",
		"machine.start web m1 h1 starting",
		"machine.start web m1 h1 started",
		"machine.capacity web m1 h1 started",
		"machine.exit web m1 h1 stopping",
		"machine.stop web m1 h1 stopped",
		"machine.update web m1 h1 stopped",
		"build.queued shop b1  queued",
		"build.running shop b1 h2 running",
		"build.failed shop b1 h2 failed",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("journal:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if msg := all[5].Message; len(msg) > store.MaxEventMessage || !strings.HasPrefix(msg, "exit code 3; xxx") || !strings.HasSuffix(msg, "…") {
		t.Errorf("the exit's message (%d bytes): %.40q…", len(msg), msg)
	}
	if all[4].Message != "waiting for room" || all[10].Message != "step 2: exit 1" {
		t.Errorf("messages: %q, %q", all[4].Message, all[10].Message)
	}

	seqs := func(f store.EventFilter) string {
		t.Helper()
		es, err := db.ListEvents(ctx, f)
		must(err)
		var out []string
		for _, e := range es {
			for i, a := range all {
				if a.ID == e.ID {
					out = append(out, fmt.Sprint(i))
				}
			}
		}
		return strings.Join(out, ",")
	}
	for _, c := range []struct {
		name string
		f    store.EventFilter
		want string
	}{
		{"app", store.EventFilter{App: "web"}, "0,2,3,4,5,6,7"},
		{"machine", store.EventFilter{Machine: "m2"}, "1"},
		{"project", store.EventFilter{Project: "shop"}, "8,9,10"},
		{"build", store.EventFilter{Build: "b1", Types: []string{"build.failed", "build.queued"}}, "8,10"},
		{"types", store.EventFilter{Types: []string{"machine.launch"}}, "0,1"},
		{"reach", store.EventFilter{Apps: []string{"api"}, Projects: []string{"shop"}}, "1,8,9,10"},
		{"reach of apps only", store.EventFilter{Apps: []string{"web"}, Projects: []string{}}, "0,2,3,4,5,6,7"},
		{"reach of nothing", store.EventFilter{Apps: []string{}, Projects: []string{}}, ""},
		{"reach and a filter", store.EventFilter{Apps: []string{"api"}, App: "web"}, ""},
		{"after", store.EventFilter{After: all[8].ID}, "9,10"},
		{"a page", store.EventFilter{After: all[2].ID, Limit: 2}, "3,4"},
		{"the tail", store.EventFilter{Newest: true, Limit: 3}, "8,9,10"},
		{"the tail after", store.EventFilter{Newest: true, After: all[9].ID, Limit: 3}, "10"},
	} {
		if got := seqs(c.f); got != c.want {
			t.Errorf("%s: events %s, want %s", c.name, got, c.want)
		}
	}

	// Retention deletes by time, and the seqs of what stays do not change.
	must(db.Note(ctx, "m2", machine.Event{Type: "capacity", Source: "kiln", Timestamp: now.Add(-48 * time.Hour)}))
	if n, err := db.PruneEvents(ctx, now.Add(-24*time.Hour)); err != nil || n != 1 {
		t.Errorf("pruning: %d %v, want 1", n, err)
	}
	if got := seqs(store.EventFilter{}); got != "0,1,2,3,4,5,6,7,8,9,10" {
		t.Errorf("after pruning: %s", got)
	}
}

func TestJournalOrderUnderConcurrency(t *testing.T) {
	forEachDialect(t, testJournalOrderUnderConcurrency)
}

// A follower resuming after the last seq it saw, while many writers commit at once,
// sees every event: a seq never becomes visible after a larger one.
func testJournalOrderUnderConcurrency(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	const writers, each = 8, 25
	for i := range writers {
		if err := createMachine(db, fmt.Sprint("m", i)); err != nil {
			t.Fatal(err)
		}
	}
	start, _ := db.ListEvents(ctx, store.EventFilter{Newest: true, Limit: 1})
	seen := map[int64]bool{}
	done := make(chan struct{})
	followed := make(chan error, 1)
	go func() {
		after := start[0].ID
		for {
			select {
			case <-done:
				followed <- follow(ctx, db, &after, seen)
				return
			default:
			}
			if err := follow(ctx, db, &after, seen); err != nil {
				followed <- err
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for i := range writers {
		wg.Go(func() {
			for range each {
				if err := db.Note(ctx, fmt.Sprint("m", i), machine.Event{Type: "capacity", Source: "kiln"}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	close(done)
	if err := <-followed; err != nil {
		t.Fatal(err)
	}
	if len(seen) != writers*each {
		t.Errorf("the follower saw %d of %d events", len(seen), writers*each)
	}
}

// follow reads the journal after *after, as GET /v1/events?follow=true does.
func follow(ctx context.Context, db *sqlstore.DB, after *int64, seen map[int64]bool) error {
	es, err := db.ListEvents(ctx, store.EventFilter{After: *after})
	for _, e := range es {
		seen[e.ID] = true
		*after = e.ID
	}
	return err
}

// Clipped text is valid UTF-8 without NUL bytes, within its bounds.
func TestEventClipped(t *testing.T) {
	e := store.Event{Type: "machine.exit", App: strings.Repeat("é", 300), Message: "bad \xff\x00 " + strings.Repeat("€", 1000)}.Clipped()
	for _, f := range []string{e.App, e.Message} {
		if !utf8.ValidString(f) || strings.ContainsRune(f, 0) || !strings.HasSuffix(f, "…") {
			t.Errorf("clipped: %.60q", f)
		}
	}
	if len(e.App) > 256 || len(e.Message) > store.MaxEventMessage || !strings.HasPrefix(e.Message, "bad \uFFFD ") || e.Type != "machine.exit" {
		t.Errorf("clipped: %d, %d bytes; %.20q", len(e.App), len(e.Message), e.Message)
	}
}

func TestHostileEventMessageKept(t *testing.T) { forEachDialect(t, testHostileEventMessageKept) }

// A message with a NUL byte and invalid UTF-8 (a guest's console tail in a boot failure)
// is kept cleaned in the machine's journal and the journal of everything, and does not
// refuse the change it describes (PostgreSQL refuses both in text).
func testHostileEventMessageKept(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	db.CreateApp(ctx, "web")
	if err := db.CreateMachine(ctx, store.Machine{ID: "m1", App: "web", Name: "a", State: machine.Created, Config: []byte(`{}`)}, machine.Event{Type: "launch", Source: "user"}); err != nil {
		t.Fatal(err)
	}
	if err := db.Transition(ctx, "m1", machine.Created, machine.Starting, machine.Event{Type: "start", Source: "kiln", Message: "boot failed: \x00\xffpanic"}); err != nil {
		t.Fatalf("a transition with a hostile message: %v", err)
	}
	evs, err := db.Events(ctx, "m1")
	if err != nil || len(evs) != 2 || evs[1].Message != "boot failed: \uFFFDpanic" {
		t.Errorf("machine events: %v %+v", err, evs)
	}
	all, err := db.ListEvents(ctx, store.EventFilter{Machine: "m1"})
	if err != nil || len(all) != 2 || all[1].Message != "boot failed: \uFFFDpanic" {
		t.Errorf("journal: %v %+v", err, all)
	}
}

func TestDeletedAppLeavesNoJournal(t *testing.T) { forEachDialect(t, testDeletedAppLeavesNoJournal) }

// A deleted app's journal goes with it: its name can be taken again, by another tenant,
// who must not read its history.
func testDeletedAppLeavesNoJournal(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	db.CreateApp(ctx, "gone")
	db.CreateApp(ctx, "kept")
	for _, m := range []struct{ id, app string }{{"m1", "gone"}, {"m2", "kept"}} {
		if err := db.CreateMachine(ctx, store.Machine{ID: m.id, App: m.app, Name: m.id, State: machine.Created, Config: []byte(`{}`)}, machine.Event{Type: "launch", Source: "user"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, step := range [][2]machine.State{{machine.Created, machine.Destroying}, {machine.Destroying, machine.Destroyed}} {
		if err := db.Transition(ctx, "m1", step[0], step[1], machine.Event{Type: "destroy", Source: "user"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.DeleteApp(ctx, "gone"); err != nil {
		t.Fatal(err)
	}
	db.CreateApp(ctx, "gone")
	if es, err := db.ListEvents(ctx, store.EventFilter{App: "gone"}); err != nil || len(es) != 0 {
		t.Errorf("the new app gone reads %d events of the old one: %v", len(es), err)
	}
	if es, err := db.ListEvents(ctx, store.EventFilter{App: "kept"}); err != nil || len(es) != 1 {
		t.Errorf("app kept has %d events, want its 1: %v", len(es), err)
	}
}
