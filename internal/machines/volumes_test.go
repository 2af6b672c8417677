package machines

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// volumeHost is a service on a fresh SQLite database, with app web, that runs no VM:
// enough for volumes that no machine holds.
func volumeHost(t *testing.T, host string) (*Service, *sqlstore.DB) {
	t.Helper()
	dir := t.TempDir()
	db, err := sqlstore.Open(context.Background(), filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := db.CreateApp(context.Background(), "web"); err != nil {
		t.Fatal(err)
	}
	s := New(Config{Store: db, VMs: &vmrun.Runtime{DataDir: dir}, Dir: filepath.Join(dir, "machines"), Host: host})
	t.Cleanup(s.Close)
	return s, db
}

// A fork starts as a byte-for-byte copy of its source, at the source's size unless
// asked for more; less is refused, and so is a fork that names a snapshot as well.
func TestForkCopiesTheSource(t *testing.T) {
	s, _ := volumeHost(t, "")
	ctx := context.Background()
	src, err := s.CreateVolume(ctx, "web", VolumeSpec{Name: "pg_data", SizeGB: 2})
	if err != nil {
		t.Fatal(err)
	}
	if src.SnapshotRetention != DefaultSnapshotRetention || src.AutoBackup {
		t.Errorf("defaults: %+v", src)
	}
	// Bytes in the filesystem's free space near the end of the image: a copy of the
	// file has them, a new filesystem does not.
	mark := []byte("written in the source")
	f, err := os.OpenFile(src.Path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(mark, src.SizeBytes-1<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	hasMark := func(v store.Volume) bool {
		b := make([]byte, len(mark))
		f, err := os.Open(v.Path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		f.ReadAt(b, src.SizeBytes-1<<20)
		return bytes.Equal(b, mark)
	}

	fork, err := s.CreateVolume(ctx, "web", VolumeSpec{Name: "fork", SourceID: src.ID, SnapshotRetention: 9})
	if err != nil {
		t.Fatal(err)
	}
	if fork.ID == src.ID || fork.SizeBytes != 2<<30 || fork.SnapshotRetention != 9 || !hasMark(fork) {
		t.Errorf("fork: %+v, has the source's bytes: %v", fork, hasMark(fork))
	}
	bigger, err := s.CreateVolume(ctx, "web", VolumeSpec{Name: "bigger", SourceID: "pg_data", SizeGB: 3})
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(bigger.Path); bigger.SizeBytes != 3<<30 || fi.Size() != 3<<30 || !hasMark(bigger) {
		t.Errorf("bigger fork: %+v, has the source's bytes: %v", bigger, hasMark(bigger))
	}
	if _, err := s.CreateVolume(ctx, "web", VolumeSpec{Name: "smaller", SourceID: src.ID, SizeGB: 1}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("a fork smaller than its source: %v", err)
	}
	if _, err := s.CreateVolume(ctx, "web", VolumeSpec{Name: "both", SourceID: src.ID, SnapshotID: "vs_x"}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("fork and restore at once: %v", err)
	}
	if _, err := s.CreateVolume(ctx, "web", VolumeSpec{Name: "orphan", SourceID: "nope"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("fork of no volume: %v", err)
	}
	if matches, _ := filepath.Glob(filepath.Join(s.volumeDir(), "*")); len(matches) != 3 {
		t.Errorf("a refused volume left files: %v", matches)
	}
	if _, err := s.CreateVolume(ctx, "web", VolumeSpec{Name: "long", SnapshotRetention: MaxSnapshotRetention + 1}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("retention over the maximum: %v", err)
	}
}

// The sweep deletes, files and records, the snapshots older than their volume's
// retention and only those; a volume with auto backups gets a snapshot once its newest
// is a day old. A changed retention applies to the snapshots already taken.
func TestSweepKeepsSnapshotsTheirRetention(t *testing.T) {
	s, db := volumeHost(t, "")
	ctx := context.Background()
	now := time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC)
	short, err := s.CreateVolume(ctx, "web", VolumeSpec{Name: "short", SnapshotRetention: 2})
	if err != nil {
		t.Fatal(err)
	}
	long, err := s.CreateVolume(ctx, "web", VolumeSpec{Name: "long"})
	if err != nil {
		t.Fatal(err)
	}
	snap := func(v store.Volume, age time.Duration) store.Snapshot {
		t.Helper()
		sn, err := s.snapshot(ctx, v, now.Add(-age))
		if err != nil {
			t.Fatal(err)
		}
		return sn
	}
	expired := snap(short, 49*time.Hour)
	kept := snap(short, 20*time.Hour)
	longKept := snap(long, 4*24*time.Hour)
	if err := s.Sweep(ctx, now); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(expired.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an expired snapshot's file is still there: %v", err)
	}
	for _, sn := range []store.Snapshot{kept, longKept} {
		if _, err := os.Stat(sn.Path); err != nil {
			t.Errorf("snapshot %s within its retention: %v", sn.ID, err)
		}
	}
	ids := func() []string {
		all, err := db.AllSnapshots(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, sn := range all {
			out = append(out, sn.ID)
		}
		return out
	}
	if got := ids(); len(got) != 2 || got[0] != longKept.ID || got[1] != kept.ID {
		t.Errorf("after the sweep: %v, want %s %s", got, longKept.ID, kept.ID)
	}

	// Shorter retention: the four-day-old snapshot goes at the next sweep.
	three := 3
	if _, err := s.UpdateVolume(ctx, "web", "long", &three, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Sweep(ctx, now); err != nil {
		t.Fatal(err)
	}
	if got := ids(); len(got) != 1 || got[0] != kept.ID {
		t.Errorf("after a shorter retention: %v, want %s", got, kept.ID)
	}

	// Auto backups: short's newest snapshot is 20 hours old, so none is due now; five
	// hours later one is, taken at that time. long has none, so it gets one at once.
	on := true
	for _, name := range []string{"short", "long"} {
		if v, err := s.UpdateVolume(ctx, "web", name, nil, &on); err != nil || !v.AutoBackup {
			t.Fatalf("auto backup on: %+v %v", v, err)
		}
	}
	if err := s.Sweep(ctx, now); err != nil {
		t.Fatal(err)
	}
	if sns, _ := db.Snapshots(ctx, short.ID); len(sns) != 1 {
		t.Errorf("a snapshot taken before its day: %+v", sns)
	}
	if sns, _ := db.Snapshots(ctx, long.ID); len(sns) != 1 || !sns[0].CreatedAt.Equal(now) || sns[0].StoredBytes <= 0 {
		t.Errorf("long's first daily snapshot: %+v", sns)
	}
	later := now.Add(5 * time.Hour)
	if err := s.Sweep(ctx, later); err != nil {
		t.Fatal(err)
	}
	if sns, _ := db.Snapshots(ctx, short.ID); len(sns) != 2 || !sns[1].CreatedAt.Equal(later) {
		t.Errorf("short's daily snapshot: %+v", sns)
	}
	if sns, _ := db.Snapshots(ctx, long.ID); len(sns) != 1 {
		t.Errorf("long got a second snapshot within a day: %+v", sns)
	}
}

// In a database hosts share, a host sweeps only the snapshots whose files it has: the
// record of another host's snapshot stays for that host to delete with its file.
func TestSweepLeavesOtherHostsSnapshots(t *testing.T) {
	s, db := volumeHost(t, "h1")
	ctx := context.Background()
	if err := db.CreateVolume(ctx, store.Volume{ID: "vol_there", App: "web", Name: "there", SizeBytes: 1 << 30, Path: "/elsewhere/vol_there.ext4"}); err != nil {
		t.Fatal(err)
	}
	if err := db.AddSnapshot(ctx, store.Snapshot{ID: "vs_there", VolumeID: "vol_there", Path: "/elsewhere/vs_there.ext4",
		CreatedAt: time.Now().Add(-30 * 24 * time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if err := s.Sweep(ctx, time.Now()); err != nil {
		t.Fatal(err)
	}
	if sns, _ := db.AllSnapshots(ctx); len(sns) != 1 {
		t.Errorf("another host's snapshot record was deleted: %+v", sns)
	}
}

// A volume from before retention existed (0 after the migration) keeps its snapshots:
// an upgrade deletes nothing.
func TestSweepKeepsOldVolumesSnapshots(t *testing.T) {
	s, db := volumeHost(t, "")
	ctx := context.Background()
	now := time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC)
	v, err := s.CreateVolume(ctx, "web", VolumeSpec{Name: "old"})
	if err != nil {
		t.Fatal(err)
	}
	sn, err := s.snapshot(ctx, v, now.Add(-400*24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if err := db.SetVolumeSnapshots(ctx, v.ID, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := s.Sweep(ctx, now); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sn.Path); err != nil {
		t.Errorf("a snapshot of a volume without retention was swept: %v", err)
	}
}
