package machinelog

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnhq/kiln/internal/guest"
)

// A machine's stored output is kiln's alone: workloads print secrets. A log an older
// kiln left readable to all is tightened when it is next opened.
func TestMachineLogsArePrivate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "m1")
	os.MkdirAll(dir, 0o755)
	os.WriteFile(filepath.Join(dir, "output.log"), nil, 0o644)
	l, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	l.Reset()
	l.Add(guest.Record{Offset: 0, Stream: 1, Data: []byte("password=hunter2\n")})
	l.Close()
	for name, want := range map[string]os.FileMode{"output.log": 0o600, "offset": 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s has mode %v, want %v", name, fi.Mode().Perm(), want)
		}
	}
	fresh := filepath.Join(t.TempDir(), "m2")
	l, err = Open(fresh)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	if fi, _ := os.Stat(fresh); fi.Mode().Perm() != 0o700 {
		t.Errorf("a new log directory has mode %v, want -rwx------", fi.Mode().Perm())
	}
}

// The offset kept on disk is written at most every offsetEvery while output flows, and
// always when the log is closed: after a clean stop it is exact.
func TestLogOffsetSurvivesClose(t *testing.T) {
	dir := t.TempDir()
	l, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	l.Reset()
	var off int64
	for range 500 {
		l.Add(guest.Record{Offset: off, Stream: 1, Data: []byte("line\n")})
		off += 5
	}
	if got := l.Offset(); got != off {
		t.Errorf("offset in use %d, want %d", got, off)
	}
	l.Close()
	if got := (&File{dir: dir}).Offset(); got != off {
		t.Errorf("offset after close %d, want %d", got, off)
	}
}
