package node

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
	l, err := openLog(dir)
	if err != nil {
		t.Fatal(err)
	}
	l.reset()
	l.add(guest.Record{Offset: 0, Stream: 1, Data: []byte("password=hunter2\n")})
	l.close()
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
	l, err = openLog(fresh)
	if err != nil {
		t.Fatal(err)
	}
	l.close()
	if fi, _ := os.Stat(fresh); fi.Mode().Perm() != 0o700 {
		t.Errorf("a new log directory has mode %v, want -rwx------", fi.Mode().Perm())
	}
}

// The offset kept on disk is written at most every offsetEvery while output flows, and
// always when the log is closed: after a clean stop it is exact.
func TestLogOffsetSurvivesClose(t *testing.T) {
	dir := t.TempDir()
	l, err := openLog(dir)
	if err != nil {
		t.Fatal(err)
	}
	l.reset()
	var off int64
	for range 500 {
		l.add(guest.Record{Offset: off, Stream: 1, Data: []byte("line\n")})
		off += 5
	}
	if got := l.offset(); got != off {
		t.Errorf("offset in use %d, want %d", got, off)
	}
	l.close()
	if got := (&logFile{dir: dir}).offset(); got != off {
		t.Errorf("offset after close %d, want %d", got, off)
	}
}
