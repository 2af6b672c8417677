package firecracker

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/testutil"
)

// The jail belongs to the VM's user, so what kiln takes out of it (snapshots, a Diff's
// memory) may be a link to a host file, a FIFO or a hard link: each is refused, and the
// host file keeps its owner and content.
func TestJailedFilesAreNotFollowed(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	jailDir, out := t.TempDir(), t.TempDir()
	secret := filepath.Join(t.TempDir(), "admin-token")
	os.WriteFile(secret, []byte("secret"), 0o600)
	os.Chown(secret, 4242, 4242) // not root's, so that a chown to root shows

	link := filepath.Join(jailDir, "vmstate")
	os.Symlink(secret, link)
	fifo := filepath.Join(jailDir, "memory")
	syscall.Mkfifo(fifo, 0o600)
	hard := filepath.Join(jailDir, "memory.diff")
	os.Link(secret, hard)

	jd, err := os.Open(jailDir)
	if err != nil {
		t.Fatal(err)
	}
	defer jd.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for _, from := range []string{link, fifo, hard} {
			to := filepath.Join(out, filepath.Base(from))
			if err := moveOut(jd, filepath.Base(from), to); err == nil {
				t.Errorf("moveOut(%s) took it", from)
			}
			if _, err := os.Lstat(to); err == nil {
				t.Errorf("%s arrived at %s", from, to)
			}
		}
		base := filepath.Join(out, "base")
		os.WriteFile(base, make([]byte, 4096), 0o600)
		for _, diff := range []string{link, fifo, hard} {
			if err := mergeDiffIn(base, jd, diff); err == nil {
				t.Errorf("a Diff merge read %s", diff)
			}
		}
		if b, _ := os.ReadFile(base); strings.Contains(string(b), "secret") {
			t.Error("the host file's content reached the memory file")
		}
		// Linking into a jail takes regular files only.
		if err := linkIn(link, filepath.Join(t.TempDir(), "x"), true, 4243, 4243); err == nil {
			t.Error("linkIn linked a symbolic link")
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a FIFO in the jail hung kiln")
	}
	fi, _ := os.Stat(secret)
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 4242 {
		t.Errorf("the host file's owner became %d", st.Uid)
	}
	if b, _ := os.ReadFile(secret); string(b) != "secret" {
		t.Errorf("the host file now holds %q", b)
	}
}

// The jail's snapshot directory is opened without following links: replaced by a link
// to another VM's snapshot directory, it is refused, and nothing of that VM's moves.
func TestJailDirectoryLinkIsRefused(t *testing.T) {
	base := t.TempDir()
	jl := &jail{dir: filepath.Join(base, "vm1")}
	jl.root = filepath.Join(jl.dir, "root")
	other := filepath.Join(base, "other-vm-snapshot")
	os.MkdirAll(jl.root, 0o755)
	os.MkdirAll(other, 0o755)
	os.WriteFile(filepath.Join(other, "vmstate"), []byte("another tenant's"), 0o600)
	if err := os.Symlink(other, jl.host(snapshotDir)); err != nil {
		t.Fatal(err)
	}
	if d, err := jl.openDir(snapshotDir); err == nil {
		d.Close()
		t.Fatal("a link in place of the jail's snapshot directory was followed")
	}
	os.Remove(jl.host(snapshotDir))
	os.Mkdir(jl.host(snapshotDir), 0o700)
	d, err := jl.openDir(snapshotDir)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}

// A socket kiln dials in a jail must be served by the VMM's own process: a link to
// another process's socket is refused.
func TestPeerIsTheVMM(t *testing.T) {
	sock := testutil.Listen(t, "unix", filepath.Join(t.TempDir(), "s")).Addr().String()
	for pid, ok := range map[int]bool{os.Getpid(): true, os.Getpid() + 100000: false, 0: true} {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		if err := peerIs(c, pid); (err == nil) != ok {
			t.Errorf("peerIs(pid %d) = %v", pid, err)
		}
		c.Close()
	}
}
