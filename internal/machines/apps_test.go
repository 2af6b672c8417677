package machines

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

// Deleting an app with force destroys what it holds, but not past a lease: a leased
// machine stops the delete before anything is destroyed. Without force, an app that
// holds anything is refused.
func TestDeleteAppHonoursLeases(t *testing.T) {
	s, db := volumeHost(t, "")
	ctx := context.Background()
	rec := store.Machine{ID: "m1", App: "web", Name: "m1", State: machine.Created, Config: []byte(`{"image":"x"}`)}
	if err := db.CreateMachine(ctx, rec, machine.Event{Type: "launch", Source: "user"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume(ctx, "web", VolumeSpec{Name: "data", SizeGB: 1}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteApp(ctx, "web", false); !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("delete without force of an app with a machine: %v, want a conflict", err)
	}
	l, err := s.TakeLease(ctx, "m1", "", time.Minute, "deploy")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteApp(ctx, "web", true); !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("forced delete of an app with a leased machine: %v, want a conflict", err)
	}
	if m, _ := db.GetMachine(ctx, "m1"); m.State == machine.Destroyed {
		t.Fatal("the leased machine was destroyed")
	}
	if vs, _ := db.ListVolumes(ctx, "web"); len(vs) != 1 {
		t.Fatalf("the refused delete removed volumes: %+v", vs)
	}
	if err := s.ReleaseLease(ctx, "m1", l.Nonce); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteApp(ctx, "web", true); err != nil {
		t.Fatalf("forced delete: %v", err)
	}
	if _, err := db.ListMachines(ctx, "web"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("the app outlived its delete: %v", err)
	}
	if err := s.DeleteApp(ctx, "_builders", true); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("deleting kiln's own app: %v, want not found", err)
	}
}
