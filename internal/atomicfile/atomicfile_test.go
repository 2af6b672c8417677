package atomicfile_test

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/kilnhq/kiln/internal/atomicfile"
)

// entries lists a directory's names, so a test can see that no temp file is left.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

func checkFile(t *testing.T, path string, want []byte, mode fs.FileMode) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s holds %q, want %q", path, got, want)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != mode {
		t.Errorf("%s has mode %v, want %v", path, fi.Mode().Perm(), mode)
	}
}

func TestWriteFileCreatesAndReplaces(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state")
	if err := atomicfile.WriteFile(p, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	checkFile(t, p, []byte("one"), 0o600)
	// The mode is the one asked for, exactly: the umask does not widen or narrow it, and
	// a replaced file takes the new mode.
	if err := atomicfile.WriteFile(p, []byte("two, longer"), 0o640); err != nil {
		t.Fatal(err)
	}
	checkFile(t, p, []byte("two, longer"), 0o640)
	if got := entries(t, dir); len(got) != 1 || got[0] != "state" {
		t.Errorf("directory holds %v, want only state", got)
	}
}

func TestWriteFileErrorLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	// A directory where the file should go: the rename fails after the data is written.
	p := filepath.Join(dir, "taken")
	if err := os.Mkdir(p, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.WriteFile(p, []byte("data"), 0o600); err == nil {
		t.Fatal("writing over a directory succeeded")
	}
	if got := entries(t, dir); len(got) != 1 || got[0] != "taken" {
		t.Errorf("after a failed write the directory holds %v, want only taken", got)
	}
	// A missing directory fails before anything is created.
	if err := atomicfile.WriteFile(filepath.Join(dir, "nope", "f"), []byte("x"), 0o600); err == nil {
		t.Error("writing into a missing directory succeeded")
	}
}

func TestAbortKeepsOldContent(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state")
	if err := atomicfile.WriteFile(p, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := atomicfile.Create(p, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte("half of the new"))
	// Until Commit nothing shows under the name.
	checkFile(t, p, []byte("old"), 0o644)
	if err := f.Abort(); err != nil {
		t.Fatal(err)
	}
	checkFile(t, p, []byte("old"), 0o644)
	if got := entries(t, dir); len(got) != 1 {
		t.Errorf("after Abort the directory holds %v, want only state", got)
	}
	if err := f.Commit(); err == nil {
		t.Error("Commit after Abort succeeded")
	}
	checkFile(t, p, []byte("old"), 0o644)
}

func TestFileIsSeekable(t *testing.T) {
	// Writers such as an ext4 builder seek back to patch headers.
	p := filepath.Join(t.TempDir(), "img")
	f, err := atomicfile.Create(p, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Abort()
	f.Write([]byte("xxxxBODY"))
	f.Seek(0, 0)
	f.Write([]byte("HEAD"))
	if err := f.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := f.Abort(); err != nil {
		t.Errorf("Abort after Commit: %v", err)
	}
	checkFile(t, p, []byte("HEADBODY"), 0o644)
}

func TestConcurrentWritersNeverMix(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state")
	const n = 16
	var wg sync.WaitGroup
	want := map[string]bool{}
	for i := range n {
		data := bytes.Repeat([]byte(fmt.Sprintf("writer %02d;", i)), 4096)
		want[string(data)] = true
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := atomicfile.WriteFile(p, data, 0o600); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !want[string(got)] {
		t.Errorf("the file holds %d bytes that no single writer wrote", len(got))
	}
	if got := entries(t, dir); len(got) != 1 {
		t.Errorf("directory holds %v, want only state", got)
	}
}

func TestRenameMovesATree(t *testing.T) {
	dir := t.TempDir()
	tmp := filepath.Join(dir, "tree.tmp")
	os.MkdirAll(filepath.Join(tmp, "sub"), 0o755)
	os.WriteFile(filepath.Join(tmp, "sub", "f"), []byte("x"), 0o644)
	if err := atomicfile.Rename(tmp, filepath.Join(dir, "tree")); err != nil {
		t.Fatal(err)
	}
	checkFile(t, filepath.Join(dir, "tree", "sub", "f"), []byte("x"), 0o644)
	if got := entries(t, dir); len(got) != 1 || got[0] != "tree" {
		t.Errorf("directory holds %v, want only tree", got)
	}
}
