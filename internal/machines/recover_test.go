package machines

import (
	"context"
	"database/sql"
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// crashedHost is a data dir and database as a kiln that died left them; recover starts a
// new kiln on them, as the server does.
type crashedHost struct {
	dir string
	db  *sqlstore.DB
}

func newCrashedHost(t *testing.T) *crashedHost {
	t.Helper()
	dir := t.TempDir()
	db, err := sqlstore.Open(context.Background(), filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	ctx := context.Background()
	if err := db.CreateApp(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if err := db.CreateVolume(ctx, store.Volume{ID: "vol_data", App: "web", Name: "data", SizeBytes: 1 << 30, Path: filepath.Join(dir, "vol_data.ext4")}); err != nil {
		t.Fatal(err)
	}
	return &crashedHost{dir: dir, db: db}
}

func (h *crashedHost) recover(t *testing.T) {
	t.Helper()
	var rootfs image.Cache // recovery converts no image
	m := New(Config{Store: h.db, VMs: &vmrun.Runtime{DataDir: h.dir}, Rootfs: rootfs, Dir: filepath.Join(h.dir, "machines")})
	defer m.Close()
	if err := m.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// createMachine records a machine mounting the volume, as Create does.
func (h *crashedHost) createMachine(id string) error {
	raw := []byte(`{"image":"localhost/app:1","mounts":[{"volume":"data","path":"/data"}]}`)
	rec := store.Machine{ID: id, App: "web", Name: id, State: machine.Created, Config: raw}
	return h.db.CreateMachine(context.Background(), rec, machine.Event{Type: "launch", Source: "user"}, "vol_data")
}

// checkVolumeFree checks that the volume is held by no one and that another machine can
// take it.
func (h *crashedHost) checkVolumeFree(t *testing.T) {
	t.Helper()
	v, err := h.db.GetVolume(context.Background(), "web", "data")
	if err != nil {
		t.Fatal(err)
	}
	if v.AttachedMachine != "" {
		t.Fatalf("after recovery volume data is still held by machine %s", v.AttachedMachine)
	}
	if err := h.createMachine("next"); err != nil {
		t.Fatalf("another machine cannot take the volume: %v", err)
	}
}

// kiln died in a destroy after the machine became destroying and before its volume was
// let go: the next start finishes the destroy, detach included.
func TestRecoverFinishesAHalfDoneDestroy(t *testing.T) {
	h := newCrashedHost(t)
	ctx := context.Background()
	if err := h.createMachine("m1"); err != nil {
		t.Fatal(err)
	}
	logDir := filepath.Join(h.dir, "machines", "m1")
	os.MkdirAll(logDir, 0o700)
	// The first step of destroyRecord, and then the crash.
	if err := h.db.Transition(ctx, "m1", machine.Created, machine.Destroying, machine.Event{Type: "destroy", Source: "user"}); err != nil {
		t.Fatal(err)
	}
	h.recover(t)
	rec, err := h.db.GetMachine(ctx, "m1")
	if err != nil || rec.State != machine.Destroyed {
		t.Fatalf("after recovery machine m1 is %s (%v), want destroyed", rec.State, err)
	}
	if _, err := os.Stat(logDir); !os.IsNotExist(err) {
		t.Errorf("the destroyed machine's logs are still there: %v", err)
	}
	h.checkVolumeFree(t)
}

// A kiln from before the claim and the record were one transaction died between the
// two: the volume is held by a machine that never came to be. Recovery lets it go.
func TestRecoverReleasesAVolumeHeldByNoMachine(t *testing.T) {
	h := newCrashedHost(t)
	// The store no longer allows this state to be made, so it is written as the old
	// code left it.
	raw, err := sql.Open("sqlite", filepath.Join(h.dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if _, err := raw.Exec(`UPDATE volumes SET attached_machine = 'never-created' WHERE id = 'vol_data'`); err != nil {
		t.Fatal(err)
	}
	if err := h.createMachine("m1"); err == nil {
		t.Fatal("the volume was free before recovery: the test set nothing up")
	}
	h.recover(t)
	h.checkVolumeFree(t)
}
