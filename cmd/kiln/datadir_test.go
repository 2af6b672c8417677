package main_test

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// The data dir holds the admin token, the database and every machine's output: a server
// makes it its owner's alone, new or left open by an older kiln. (Machine and build logs
// are held to 0600 by the node and build packages' tests.)
func TestServerDataDirIsPrivate(t *testing.T) {
	e := newEnv(t)
	e.dataDir = filepath.Join(e.dataDir, "fresh") // not there yet: the server makes it
	check := func(when string) {
		t.Helper()
		want := map[string]os.FileMode{
			"":            0o700,
			"admin-token": 0o600,
			"kiln.db":     0o600,
			"kiln.db-wal": 0o600,
			"kiln.db-shm": 0o600,
		}
		for name, mode := range want {
			fi, err := os.Stat(filepath.Join(e.dataDir, name))
			if err != nil {
				t.Errorf("%s: %v", when, err)
				continue
			}
			if fi.Mode().Perm() != mode {
				t.Errorf("%s: DATA_DIR/%s has mode %v, want %v", when, name, fi.Mode().Perm(), mode)
			}
		}
	}
	srv := startServer(t, e, freeAddr(t), "--proxy-listen", "off", "--network=false")
	defer stopOnFailure(&srv)
	check("a server in a fresh dir")
	srv.stop(syscall.SIGTERM)
	srv = nil

	// As an older kiln left them.
	os.Chmod(e.dataDir, 0o755)
	os.Chmod(filepath.Join(e.dataDir, "kiln.db"), 0o644)
	srv = startServer(t, e, freeAddr(t), "--proxy-listen", "off", "--network=false")
	check("a server in a dir an older kiln made")
	srv.stop(syscall.SIGTERM)
	srv = nil
}
