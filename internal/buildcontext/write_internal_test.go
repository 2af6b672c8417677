package buildcontext

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// A file that goes away while the context is sent is the caller's to fix, and the error
// names it. (Root reads unreadable files, so a file removed mid-walk stands in for one.)
func TestDirWriteTarNamesAFileItCannotRead(t *testing.T) {
	dir := t.TempDir()
	gone := filepath.Join(dir, "gone")
	if err := os.WriteFile(gone, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &Dir{path: dir, exclude: func(rel string, _ bool) (bool, bool) {
		if rel == "gone" {
			os.Remove(gone)
		}
		return false, false
	}}
	err := d.WriteTar(io.Discard)
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), gone) || !strings.Contains(err.Error(), ".dockerignore") {
		t.Fatalf("got %v, want an invalid-argument error naming %s and .dockerignore", err, gone)
	}
}
