package build

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// A host cut off mid-build still holds its attempt; the host that took the build over
// runs it again. When the first host's result finally arrives it is refused, and the
// record stays the second host's.
func TestLateResultOfATakenOverAttemptIsRefused(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db, err := sqlstore.Open(ctx, filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	now := time.Now()
	if err := db.CreateBuild(ctx, store.Build{ID: "b1", Project: "shop", State: Queued, Spec: []byte(`{}`), NotBefore: now, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
	hostA := &Service{Store: db, Dir: filepath.Join(dir, "a"), Host: "a", MaxAttempts: 3}
	hostB := &Service{Store: db, Dir: filepath.Join(dir, "b"), Host: "b", MaxAttempts: 3}

	queued, _ := db.GetBuild(ctx, "b1")
	onA, err := hostA.transition(ctx, queued, Running, nil)
	if err != nil {
		t.Fatal(err)
	}
	if onA.Attempt != 1 || onA.Host != "a" {
		t.Fatalf("host a started attempt %d on %q, want 1 on a", onA.Attempt, onA.Host)
	}
	// Host b sees a's heartbeat stop: the build goes back to the queue and b runs it.
	hostB.retryOrFail(ctx, onA, retryHostLost, "host a stopped heartbeating mid-build")
	requeued, _ := db.GetBuild(ctx, "b1")
	onB, err := hostB.transition(ctx, requeued, Running, nil)
	if err != nil {
		t.Fatal(err)
	}
	if onB.Attempt != 2 || onB.Host != "b" {
		t.Fatalf("host b started attempt %d on %q, want 2 on b", onB.Attempt, onB.Host)
	}

	// Host a comes back and reports how its attempt ended.
	_, err = hostA.transition(ctx, onA, Succeeded, func(r *api.BuildResult) { r.Image = "sha256:from-a" })
	if !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("host a's late result: %v, want a conflict", err)
	}
	got, _ := db.GetBuild(ctx, "b1")
	if got.State != Running || got.Attempt != 2 || got.Host != "b" || toAPI(got).Image != "" {
		t.Fatalf("after the late result the build is %s, attempt %d on %q, image %q; want running, attempt 2 on b, no image",
			got.State, got.Attempt, got.Host, toAPI(got).Image)
	}
	if _, err := hostB.transition(ctx, onB, Succeeded, func(r *api.BuildResult) { r.Image = "sha256:from-b" }); err != nil {
		t.Fatalf("host b's result: %v", err)
	}
}
