package volume_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/volume"
)

func requireE2fsprogs(t *testing.T) {
	for _, tool := range []string{"mkfs.ext4", "resize2fs", "e2fsck"} {
		if _, err := exec.LookPath(tool); err != nil {
			if _, err := os.Stat("/sbin/" + tool); err != nil {
				t.Skipf("%s not installed: run `make setup`", tool)
			}
		}
	}
}

func TestLifecycle(t *testing.T) {
	requireE2fsprogs(t)
	ctx := context.Background()
	img := filepath.Join(t.TempDir(), "d.ext4")
	if err := volume.Create(ctx, img, 32<<20, ""); err != nil {
		t.Fatal(err)
	}
	info, err := volume.Inspect(img)
	if err != nil {
		t.Fatal(err)
	}
	if info.FileSize != 32<<20 || info.Total < 28<<20 || info.Total > 32<<20 || info.Used <= 0 || info.Used >= info.Total || len(info.UUID) != 36 {
		t.Errorf("info = %+v", info)
	}
	if err := volume.Create(ctx, img, 32<<20, ""); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("create over an existing image: %v", err)
	}
	if err := volume.Extend(ctx, img, 64<<20); err != nil {
		t.Fatal(err)
	}
	grown, _ := volume.Inspect(img)
	if grown.Total < 60<<20 || grown.UUID != info.UUID {
		t.Errorf("after extend: %+v", grown)
	}
	if err := volume.Extend(ctx, img, 16<<20); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("shrink: %v", err)
	}
	if err := volume.Delete(img); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Error("image still exists after delete")
	}
}

func TestCreateFromDir(t *testing.T) {
	requireE2fsprogs(t)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "hello"), []byte("world"), 0o644)
	img := filepath.Join(t.TempDir(), "d.ext4")
	if err := volume.Create(context.Background(), img, 16<<20, dir); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("debugfs", "-R", "cat /hello", img).Output()
	if err == nil && string(out) != "world" {
		t.Errorf("file in image = %q", out)
	}
}

func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.img")
	os.WriteFile(junk, make([]byte, 4096), 0o644)
	if _, err := volume.Inspect(junk); !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "not an ext4 image") {
		t.Errorf("junk: %v", err)
	}
	if _, err := volume.Inspect(dir); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("directory: %v", err)
	}
	if _, err := volume.Inspect(filepath.Join(dir, "missing")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("missing: %v", err)
	}
	if err := volume.Create(context.Background(), filepath.Join(dir, "tiny"), 1<<20, ""); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("tiny: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "tiny")); !os.IsNotExist(err) {
		t.Error("a refused create left a file behind")
	}
}

func TestLocks(t *testing.T) {
	locks := volume.Locks{Dir: t.TempDir()}
	img := filepath.Join(t.TempDir(), "d.ext4")
	l, err := locks.Acquire(img, "vm-one")
	if err != nil {
		t.Fatal(err)
	}
	// The same path spelled differently is the same disk.
	_, err = locks.Acquire(filepath.Join(filepath.Dir(img), ".", "d.ext4"), "vm-two")
	if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "vm-one") {
		t.Errorf("second attach: %v; want a conflict naming vm-one", err)
	}
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	l2, err := locks.Acquire(img, "vm-two")
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	l2.Release()
	if ents, _ := os.ReadDir(locks.Dir); len(ents) != 0 {
		t.Errorf("lock files left: %d", len(ents))
	}
}
