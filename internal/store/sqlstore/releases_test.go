package sqlstore_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

func TestReleaseVersions(t *testing.T) { forEachDialect(t, testReleaseVersions) }

// Releases are numbered per app from 1, with no number taken twice by deploys that
// create theirs at once, and read back as they were stored.
func testReleaseVersions(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	if _, err := db.CreateRelease(ctx, store.Release{App: "nope"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("a release of an unknown app: %v", err)
	}
	db.CreateApp(ctx, "web")
	db.CreateApp(ctx, "api")
	const deploys = 8
	versions := make(chan int, deploys)
	var wg sync.WaitGroup
	for i := range deploys {
		wg.Go(func() {
			r, err := db.CreateRelease(ctx, store.Release{App: "web", Strategy: "rolling", Image: fmt.Sprint("web@sha256:", i), Config: json.RawMessage(`{"app":"web"}`)})
			if err != nil {
				t.Error(err)
				return
			}
			versions <- r.Version
		})
	}
	wg.Wait()
	close(versions)
	var got []int
	for v := range versions {
		got = append(got, v)
	}
	slices.Sort(got)
	if fmt.Sprint(got) != "[1 2 3 4 5 6 7 8]" {
		t.Fatalf("concurrent creates got versions %v, want 1 to 8 once each", got)
	}

	in := store.Release{App: "web", State: store.ReleaseRunning, Strategy: "canary", Image: "web@sha256:abc", Config: json.RawMessage(`{"env":{"A":"1"}}`),
		SecretsVersion: 3, Token: "tok_1", RollbackOf: 2, Message: "bad \x00\xff text"}
	r, err := db.CreateRelease(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	if r.Version != 9 || r.CreatedAt.IsZero() || !r.UpdatedAt.Equal(r.CreatedAt) || r.Message != "bad \uFFFD text" {
		t.Errorf("created: %+v", r)
	}
	stored, err := db.GetRelease(ctx, "web", 9)
	if err != nil {
		t.Fatal(err)
	}
	if !sameRelease(stored, r) {
		t.Errorf("read back\n%+v\nwant\n%+v", stored, r)
	}
	if first, _ := db.GetRelease(ctx, "web", 1); first.State != store.ReleasePending || first.Progress != nil || first.RollbackOf != 0 {
		t.Errorf("a release without state or progress: %+v", first)
	}
	if _, err := db.GetRelease(ctx, "web", 10); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("an unknown release: %v", err)
	}
	if _, err := db.CreateRelease(ctx, store.Release{App: "web", State: "exploded"}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("an unknown state: %v", err)
	}

	if r, err := db.CreateRelease(ctx, store.Release{App: "api"}); err != nil || r.Version != 1 {
		t.Errorf("another app's first release: %d %v", r.Version, err)
	}
	list, err := db.ListReleases(ctx, "web", 3)
	if err != nil || len(list) != 3 || list[0].Version != 9 || list[2].Version != 7 {
		t.Errorf("newest 3: %v %v", versionsOf(list), err)
	}
	if list, _ := db.ListReleases(ctx, "web", 0); len(list) != 9 {
		t.Errorf("all: %v", versionsOf(list))
	}
}

func sameRelease(a, b store.Release) bool {
	return a.App == b.App && a.Version == b.Version && a.State == b.State && a.Strategy == b.Strategy && a.Image == b.Image &&
		bytes.Equal(a.Config, b.Config) && a.SecretsVersion == b.SecretsVersion && a.Token == b.Token && a.RollbackOf == b.RollbackOf &&
		bytes.Equal(a.Progress, b.Progress) && a.Message == b.Message && a.CreatedAt.Equal(b.CreatedAt) && a.UpdatedAt.Equal(b.UpdatedAt)
}

func versionsOf(rs []store.Release) []string {
	var out []string
	for _, r := range rs {
		out = append(out, fmt.Sprint(r.App, r.Version))
	}
	return out
}

func TestUpdateRelease(t *testing.T) { forEachDialect(t, testUpdateRelease) }

// A release's state changes only from the state its writer read, each change is in the
// journal with the app, and progress alone is no event; ReleasesInState finds the
// deploys a restarted server must resume.
func testUpdateRelease(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	db.CreateApp(ctx, "web")
	db.CreateApp(ctx, "api")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	web, err := db.CreateRelease(ctx, store.Release{App: "web"})
	must(err)
	_, err = db.CreateRelease(ctx, store.Release{App: "api"})
	must(err)

	run := web
	run.State, run.Progress = store.ReleaseRunning, json.RawMessage(`{"step":1}`)
	must(db.UpdateRelease(ctx, run, store.ReleasePending))
	if err := db.UpdateRelease(ctx, run, store.ReleasePending); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("a stale from-state: %v", err)
	}
	stepped := run
	stepped.Progress = json.RawMessage(`{"step":2}`)
	must(db.UpdateRelease(ctx, stepped, store.ReleaseRunning))
	if got, _ := db.GetRelease(ctx, "web", 1); string(got.Progress) != `{"step":2}` || got.State != store.ReleaseRunning || !got.UpdatedAt.After(web.UpdatedAt) {
		t.Errorf("after two updates: %+v", got)
	}
	if err := db.UpdateRelease(ctx, store.Release{App: "web", Version: 7, State: store.ReleaseRunning}, store.ReleasePending); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("an unknown release: %v", err)
	}
	if err := db.UpdateRelease(ctx, store.Release{App: "web", Version: 1, State: "done"}, store.ReleaseRunning); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("an unknown state: %v", err)
	}

	inState := func(states ...string) string {
		t.Helper()
		rs, err := db.ReleasesInState(ctx, states...)
		must(err)
		return strings.Join(versionsOf(rs), ",")
	}
	if got := inState(store.ReleasePending, store.ReleaseRunning); got != "web1,api1" {
		t.Errorf("pending or running: %s", got)
	}
	failed := stepped
	failed.State, failed.Message = store.ReleaseFailed, "check web timed out"
	must(db.UpdateRelease(ctx, failed, store.ReleaseRunning))
	if got := inState(store.ReleasePending, store.ReleaseRunning); got != "api1" {
		t.Errorf("pending or running after web's failed: %s", got)
	}
	if got := inState(); got != "" {
		t.Errorf("no states: %s", got)
	}
	_, err = db.CreateRelease(ctx, store.Release{App: "web", RollbackOf: 1})
	must(err)

	es, err := db.ListEvents(ctx, store.EventFilter{Types: []string{"release.pending", "release.running", "release.failed"}})
	must(err)
	var got []string
	for _, e := range es {
		got = append(got, strings.Join([]string{e.Type, e.App, e.State, e.Message}, " | "))
	}
	want := []string{
		"release.pending | web | pending | release 1 pending",
		"release.pending | api | pending | release 1 pending",
		"release.running | web | running | release 1 running",
		"release.failed | web | failed | release 1 failed: check web timed out",
		"release.pending | web | pending | release 2 pending (a rollback to release 1)",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("journal:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestSecretsVersions(t *testing.T) { forEachDialect(t, testSecretsVersions) }

// Each put makes the next version if its writer read the latest; the sealed bytes come
// back exactly, at the latest or a given version.
func testSecretsVersions(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	db.CreateApp(ctx, "web")
	if sv, err := db.SecretsAt(ctx, "web", 0); err != nil || sv.Version != 0 || sv.Sealed != nil {
		t.Errorf("an app without secrets: %+v %v", sv, err)
	}
	if _, err := db.PutSecrets(ctx, "nope", 0, []byte{1}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("secrets of an unknown app: %v", err)
	}
	// Every byte value, NUL and invalid UTF-8 among them: sealed bytes are not text.
	one := make([]byte, 512)
	for i := range one {
		one[i] = byte(i)
	}
	if v, err := db.PutSecrets(ctx, "web", 0, one); err != nil || v != 1 {
		t.Fatalf("the first put: %d %v", v, err)
	}
	if _, err := db.PutSecrets(ctx, "web", 0, []byte("stale")); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("a put from a stale version: %v", err)
	}
	if _, err := db.PutSecrets(ctx, "web", 2, []byte("ahead")); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("a put from a version ahead: %v", err)
	}

	// Of puts from the same version at once, exactly one wins.
	const writers = 6
	var wg sync.WaitGroup
	var mu sync.Mutex
	var won, lost int
	for i := range writers {
		wg.Go(func() {
			v, err := db.PutSecrets(ctx, "web", 1, []byte{byte(i)})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil && v == 2:
				won++
			case errors.Is(err, errdefs.ErrConflict):
				lost++
			default:
				t.Errorf("a concurrent put: %d %v", v, err)
			}
		})
	}
	wg.Wait()
	if won != 1 || lost != writers-1 {
		t.Errorf("concurrent puts: %d won, %d lost", won, lost)
	}

	latest, err := db.SecretsAt(ctx, "web", 0)
	if err != nil || latest.Version != 2 || latest.App != "web" || len(latest.Sealed) != 1 || latest.CreatedAt.IsZero() {
		t.Errorf("the latest: %+v %v", latest, err)
	}
	if sv, err := db.SecretsAt(ctx, "web", 1); err != nil || sv.Version != 1 || !bytes.Equal(sv.Sealed, one) {
		t.Errorf("version 1: %d %d bytes %v", sv.Version, len(sv.Sealed), err)
	}
	if _, err := db.SecretsAt(ctx, "web", 3); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("an unknown version: %v", err)
	}
}

func TestDeletedAppLeavesNoReleasesOrSecrets(t *testing.T) {
	forEachDialect(t, testDeletedAppLeavesNoReleasesOrSecrets)
}

// Another tenant may take a deleted app's name: it finds none of its releases or
// secrets, and numbers its own from 1.
func testDeletedAppLeavesNoReleasesOrSecrets(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	for _, app := range []string{"gone", "kept"} {
		db.CreateApp(ctx, app)
		fill(t, db, app)
	}
	if err := db.DeleteApp(ctx, "gone"); err != nil {
		t.Fatal(err)
	}
	db.CreateApp(ctx, "gone")
	if rs, err := db.ListReleases(ctx, "gone", 0); err != nil || len(rs) != 0 {
		t.Errorf("the new app gone lists the old one's releases %v: %v", versionsOf(rs), err)
	}
	if sv, err := db.SecretsAt(ctx, "gone", 0); err != nil || sv.Version != 0 {
		t.Errorf("the new app gone reads the old one's secrets, version %d: %v", sv.Version, err)
	}
	if _, err := db.SecretsAt(ctx, "gone", 1); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("the old app's secrets version 1: %v", err)
	}
	if r, err := db.CreateRelease(ctx, store.Release{App: "gone"}); err != nil || r.Version != 1 {
		t.Errorf("the new app's first release: %d %v", r.Version, err)
	}
	if v, err := db.PutSecrets(ctx, "gone", 0, []byte("new")); err != nil || v != 1 {
		t.Errorf("the new app's first secrets: %d %v", v, err)
	}
	if rs, _ := db.ListReleases(ctx, "kept", 0); len(rs) != 2 {
		t.Errorf("app kept has releases %v, want its 2", versionsOf(rs))
	}
	if sv, _ := db.SecretsAt(ctx, "kept", 0); sv.Version != 2 {
		t.Errorf("app kept has secrets version %d, want 2", sv.Version)
	}
}

// fill gives app two releases and two versions of secrets.
func fill(t *testing.T, db *sqlstore.DB, app string) {
	t.Helper()
	ctx := context.Background()
	for prev := range 2 {
		if _, err := db.CreateRelease(ctx, store.Release{App: app}); err != nil {
			t.Fatal(err)
		}
		if _, err := db.PutSecrets(ctx, app, prev, []byte(app)); err != nil {
			t.Fatal(err)
		}
	}
}

func TestPruneReleases(t *testing.T) { forEachDialect(t, testPruneReleases) }

// Pruning keeps an app's newest releases, and any that has not ended, and no other
// app's.
func testPruneReleases(t *testing.T, dsn string) {
	ctx := context.Background()
	db := open(t, dsn)
	db.CreateApp(ctx, "web")
	db.CreateApp(ctx, "api")
	for i := 1; i <= 6; i++ {
		r, err := db.CreateRelease(ctx, store.Release{App: "web"})
		if err != nil {
			t.Fatal(err)
		}
		if i != 2 { // release 2 never ended
			r.State = store.ReleaseSucceeded
			if err := db.UpdateRelease(ctx, r, store.ReleasePending); err != nil {
				t.Fatal(err)
			}
		}
	}
	db.CreateRelease(ctx, store.Release{App: "api"})
	n, err := db.PruneReleases(ctx, "web", 3)
	if err != nil || n != 2 {
		t.Fatalf("pruned %d (%v), want releases 1 and 3", n, err)
	}
	rs, _ := db.ListReleases(ctx, "web", 0)
	if got := fmt.Sprint(versionsOf(rs)); got != "[web6 web5 web4 web2]" {
		t.Fatalf("kept %s", got)
	}
	if rs, _ := db.ListReleases(ctx, "api", 0); len(rs) != 1 {
		t.Fatalf("another app's releases were pruned: %v", rs)
	}
	// The latest that succeeded stays however old: rollbacks and scales start from it.
	db.CreateApp(ctx, "blog")
	for i := 1; i <= 5; i++ {
		r, _ := db.CreateRelease(ctx, store.Release{App: "blog"})
		r.State = store.ReleaseFailed
		if i == 1 {
			r.State = store.ReleaseSucceeded
		}
		if err := db.UpdateRelease(ctx, r, store.ReleasePending); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := db.PruneReleases(ctx, "blog", 2); err != nil {
		t.Fatal(err)
	}
	rs, _ = db.ListReleases(ctx, "blog", 0)
	if got := fmt.Sprint(versionsOf(rs)); got != "[blog5 blog4 blog1]" {
		t.Fatalf("kept %s, want the newest 2 and the one that succeeded", got)
	}
}
