package firecracker

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/vmm"
)

// Jailer runs Firecracker under its jailer (docs/jailer.md): in a chroot, as an
// unprivileged user. The jail is CHROOT_BASE/firecracker/ID/root; the files the VM uses
// are hard-linked into it, so the chroot base must be on the same filesystem as kiln's
// data dir.
type Jailer struct {
	Binary     string // empty means "jailer" on PATH
	UID, GID   int
	ChrootBase string // empty means /srv/jailer
}

func (j *Jailer) base() string {
	if j.ChrootBase == "" {
		return "/srv/jailer"
	}
	return j.ChrootBase
}

// dir is the per-VM jail directory the jailer creates; root is its chroot.
func (j *Jailer) dir(id string) string  { return filepath.Join(j.base(), "firecracker", id) }
func (j *Jailer) root(id string) string { return filepath.Join(j.dir(id), "root") }

// inside is where a host file linked into the jail appears to Firecracker.
func (j *Jailer) inside(p string) string {
	if p == "" {
		return ""
	}
	return "/" + filepath.Base(p)
}

// command prepares the jail (files linked in, owned by the jail's user) and returns the
// jailer command and the host path of the API socket.
func (j *Jailer) command(fcBin string, cfg vmm.Config) (*exec.Cmd, string, error) {
	bin := j.Binary
	if bin == "" {
		bin = "jailer"
	}
	jb, err := exec.LookPath(bin)
	if err != nil {
		return nil, "", errdefs.New(errdefs.ErrMissingDependency, "jailer binary (%s) not found: install it beside firecracker, or run without the jailer", bin)
	}
	root := j.root(cfg.ID)
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, "", err
	}
	files := []string{cfg.Kernel, cfg.Initramfs}
	for _, d := range cfg.Disks {
		files = append(files, d.Path)
	}
	seen := map[string]bool{}
	for _, f := range files {
		if f == "" {
			continue
		}
		name := filepath.Base(f)
		if seen[name] {
			return nil, "", errdefs.Invalid("two files named %s would collide in the jail: rename one", name)
		}
		seen[name] = true
		dst := filepath.Join(root, name)
		if err := os.Link(f, dst); err != nil {
			return nil, "", fmt.Errorf("linking %s into the jail (the chroot base must be on the same filesystem): %w", f, err)
		}
		if err := os.Chown(dst, j.UID, j.GID); err != nil {
			return nil, "", err
		}
	}
	cmd := exec.Command(jb,
		"--id", cfg.ID,
		"--exec-file", fcBin,
		"--uid", strconv.Itoa(j.UID),
		"--gid", strconv.Itoa(j.GID),
		"--chroot-base-dir", j.base(),
		"--",
		"--api-sock", "/"+apiSock,
	)
	return cmd, filepath.Join(root, apiSock), nil
}
