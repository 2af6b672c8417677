package build

import (
	"os"
	"testing"
)

// A build's log is kiln's alone: build steps print secrets too.
func TestBuildLogIsPrivate(t *testing.T) {
	s := &Service{Dir: t.TempDir()}
	s.writeLog("b1", "kiln: hello\n")
	fi, err := os.Stat(s.LogPath("b1"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("the build log has mode %v, want -rw-------", fi.Mode().Perm())
	}
}
