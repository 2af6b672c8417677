package volume

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Locks keeps each disk image attached to at most one VM on this host. A lock is a
// flock(2) on a small file under Dir named for the image's absolute path, so it is
// released by the kernel when its holder dies and never goes stale. The file records the
// holder so that a refused attach can say who holds the disk.
type Locks struct{ Dir string }

// Holder says who has a disk attached.
type Holder struct {
	VM  string `json:"vm"`
	PID int    `json:"pid"`
}

// Lease is a held attach lock.
type Lease struct {
	f    *os.File
	path string
}

func (l Locks) file(image string) (string, error) {
	abs, err := filepath.Abs(image)
	if err != nil {
		return "", err
	}
	if r, err := filepath.EvalSymlinks(abs); err == nil {
		abs = r
	}
	sum := sha256.Sum256([]byte(abs))
	return filepath.Join(l.Dir, hex.EncodeToString(sum[:8])+".lock"), nil
}

// Acquire takes image's lock for vm, or fails with ErrConflict naming the holder.
func (l Locks) Acquire(image, vm string) (*Lease, error) {
	if err := os.MkdirAll(l.Dir, 0o755); err != nil {
		return nil, err
	}
	p, err := l.file(image)
	if err != nil {
		return nil, err
	}
	for {
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, err
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			var h Holder
			b, _ := os.ReadFile(p)
			json.Unmarshal(b, &h)
			f.Close()
			if h.VM == "" {
				return nil, errdefs.New(errdefs.ErrConflict, "disk %s is attached to another VM: stop that VM first", image)
			}
			return nil, errdefs.New(errdefs.ErrConflict, "disk %s is attached to VM %s (pid %d): stop that VM first", image, h.VM, h.PID)
		}
		// A releaser may have unlinked the file between our open and lock; then our lock
		// guards nothing, so start over on the new file.
		var a, b unix.Stat_t
		if unix.Fstat(int(f.Fd()), &a) != nil || unix.Stat(p, &b) != nil || a.Ino != b.Ino {
			f.Close()
			continue
		}
		data, _ := json.Marshal(Holder{VM: vm, PID: os.Getpid()})
		f.Truncate(0)
		f.WriteAt(data, 0)
		return &Lease{f: f, path: p}, nil
	}
}

// Release drops the lock and its file.
func (l *Lease) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	os.Remove(l.path)
	err := l.f.Close()
	l.f = nil
	if err != nil {
		return fmt.Errorf("releasing disk lock: %w", err)
	}
	return nil
}
