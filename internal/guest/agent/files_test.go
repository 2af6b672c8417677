package agent

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnhq/kiln/internal/guest"
)

// A workload's files are written with their mode, in directories made as needed, and a
// symlink at the path is replaced, not followed.
func TestWriteFiles(t *testing.T) {
	dir := t.TempDir()
	outside := filepath.Join(dir, "outside")
	os.WriteFile(outside, []byte("keep"), 0o644)
	link := filepath.Join(dir, "etc", "link")
	os.MkdirAll(filepath.Dir(link), 0o755)
	os.Symlink(outside, link)
	files := []guest.File{
		{Path: filepath.Join(dir, "new", "deep", "a.conf"), Mode: 0o600, Data: []byte("a\n")},
		{Path: link, Data: []byte("b\n")},
	}
	if err := writeFiles(files); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(files[0].Path)
	if b, _ := os.ReadFile(files[0].Path); err != nil || string(b) != "a\n" || fi.Mode().Perm() != 0o600 {
		t.Fatalf("a.conf: %q %v %v", b, fi, err)
	}
	if b, _ := os.ReadFile(outside); string(b) != "keep" {
		t.Fatalf("the symlink was followed: its target now holds %q", b)
	}
	if fi, err := os.Lstat(link); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o644 {
		t.Fatalf("the file at the symlink's path: %v %v", fi, err)
	}
	if err := writeFiles([]guest.File{{Path: "relative/x"}}); err == nil {
		t.Fatal("a relative path was written")
	}
}
