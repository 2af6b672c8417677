package firecracker

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/vmm"
)

// Jailer runs Firecracker under its jailer (docs/jailer.md): in a chroot of its own, in a
// new mount namespace, as the VM's unprivileged user. The jail of VM ID is
// CHROOT_BASE/<firecracker binary's name>/ID/root. Firecracker opens every file the API
// names itself, inside that root, so the VM's files are hard-linked into it: the chroot
// base must be on the filesystem of kiln's data dir.
//
// The jailer is started inside the VM's cgroup, which vmrun made and sized, and execs
// Firecracker in place, so Firecracker runs there; the jailer's own --cgroup flags are
// not used, as they would only make the same group again.
type Jailer struct {
	Binary     string // empty means "jailer" on PATH
	ChrootBase string // empty means /srv/jailer
	// UID and GID are used for VMs whose Config names no user; vmrun always names one.
	UID, GID int
}

// jailedAPISock is where Firecracker makes its API socket inside the jail (its default).
const jailedAPISock = "/run/firecracker.socket"

// snapshotDir is where, inside the jail, Firecracker writes and reads snapshots.
const snapshotDir = "/snapshot"

func (j *Jailer) base() string {
	if j.ChrootBase == "" {
		return "/srv/jailer"
	}
	return j.ChrootBase
}

func (j *Jailer) binary() (string, error) {
	bin := j.Binary
	if bin == "" {
		bin = "jailer"
	}
	p, err := exec.LookPath(bin)
	if err != nil {
		return "", errdefs.New(errdefs.ErrMissingDependency, "the jailer binary (%s) is not on this host: install it from Firecracker's release beside firecracker (or name it with KILN_JAILER); kiln runs Firecracker only under its jailer", bin)
	}
	return p, nil
}

// jail is one VM's jail.
type jail struct {
	dir  string // removed by release
	root string // the chroot
}

func (j *Jailer) jail(fcBin, id string) *jail {
	dir := filepath.Join(j.base(), filepath.Base(fcBin), id)
	return &jail{dir: dir, root: filepath.Join(dir, "root")}
}

// host is the host path of a path inside the jail.
func (jl *jail) host(inside string) string { return filepath.Join(jl.root, inside) }

// user is the VM's user: its Config's, else the Jailer's.
func (j *Jailer) user(cfg vmm.Config) (int, int, error) {
	uid, gid := int(cfg.Confine.UID), int(cfg.Confine.GID)
	if uid == 0 {
		uid, gid = j.UID, j.GID
	}
	if uid == 0 || gid == 0 {
		return 0, 0, errdefs.Invalid("the jailer runs Firecracker as an unprivileged user: vm %s names none", cfg.ID)
	}
	return uid, gid, nil
}

// inside is where a host file linked into the jail appears to Firecracker.
func inside(p string) string {
	if p == "" {
		return ""
	}
	return "/" + filepath.Base(p)
}

// command makes a fresh jail for cfg, with the VM's files linked in (each at inside(its
// path)), and returns the jailer command and the jail.
func (j *Jailer) command(fcBin string, cfg vmm.Config) (*exec.Cmd, *jail, error) {
	jb, err := j.binary()
	if err != nil {
		return nil, nil, err
	}
	uid, gid, err := j.user(cfg)
	if err != nil {
		return nil, nil, err
	}
	jl := j.jail(fcBin, cfg.ID)
	// The jail of an earlier VMM of this VM (before a suspend) must not be reused.
	if err := jl.release(); err != nil {
		return nil, nil, err
	}
	for _, d := range []string{"run", "snapshot"} {
		if err := os.MkdirAll(jl.host(d), 0o700); err != nil {
			return nil, nil, err
		}
		if err := os.Chown(jl.host(d), uid, gid); err != nil {
			return nil, nil, err
		}
	}
	seen := map[string]bool{}
	link := func(src string, writable bool) error {
		if src == "" {
			return nil
		}
		name := inside(src)
		if seen[name] {
			return errdefs.Invalid("two files named %s would collide in the jail: rename one", name[1:])
		}
		seen[name] = true
		return linkIn(src, jl.host(name), writable, uid, gid)
	}
	files := []string{cfg.Kernel, cfg.Initramfs}
	for _, f := range files {
		if err := link(f, false); err != nil {
			jl.release()
			return nil, nil, err
		}
	}
	for _, d := range cfg.Disks {
		if err := link(d.Path, !d.ReadOnly); err != nil {
			jl.release()
			return nil, nil, err
		}
	}
	// Firecracker attaches to its TAP devices itself, without CAP_NET_ADMIN: each must
	// belong to the VM's user.
	for _, n := range cfg.NICs {
		if err := setTAPOwner(n.HostDev, uid, gid); err != nil {
			jl.release()
			return nil, nil, err
		}
	}
	cmd := exec.Command(jb,
		"--id", cfg.ID,
		"--exec-file", fcBin,
		"--uid", strconv.Itoa(uid),
		"--gid", strconv.Itoa(gid),
		"--chroot-base-dir", j.base(),
		"--",
		"--api-sock", jailedAPISock,
	)
	return cmd, jl, nil
}

// linkIn hard-links a host file into the jail. A file the VM writes (a volume, held by
// this VM alone) is handed to the VM's user until release gives it back to root. A
// read-only file that others may read (a kernel, a root filesystem shared by many VMs)
// is linked as it is; one they may not read is copied for this VM, since changing the
// shared file's owner would hand it to one VM's user.
func linkIn(src, dst string, writable bool, uid, gid int) error {
	fi, err := os.Lstat(src)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return errdefs.Invalid("%s is not a regular file (%v): only files are linked into a jail", src, fi.Mode())
	}
	if writable || fi.Mode().Perm()&0o004 != 0 {
		if err := os.Link(src, dst); err != nil {
			if writable || !errors.Is(err, syscall.EXDEV) {
				return fmt.Errorf("linking %s into the jail (the chroot base must be on the same filesystem): %w", src, err)
			}
			return copyIn(src, dst, uid, gid)
		}
		if writable {
			return os.Lchown(dst, uid, gid)
		}
		return nil
	}
	return copyIn(src, dst, uid, gid)
}

func copyIn(src, dst string, uid, gid int) error {
	in, err := os.OpenFile(src, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o400)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Chown(uid, gid); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// release gives back to root what the VM's user was given: the host files linked into
// the jail (a hard link shares its owner with the original) and its TAP devices, which
// the next VM given the same user could otherwise attach to. Then it removes the jail.
// The user is the owner of the jail's root, which the jailer hands to it and which it
// cannot give away; nothing in the jail is followed, as that user may have changed it.
func (jl *jail) release() error {
	uid := -1
	for _, d := range []string{jl.root, jl.host("run")} {
		if fi, err := os.Lstat(d); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != 0 {
				uid = int(st.Uid)
				break
			}
		}
	}
	var err error
	if uid > 0 {
		filepath.WalkDir(jl.root, func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			if fi, err := d.Info(); err == nil {
				if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Nlink > 1 && int(st.Uid) == uid {
					os.Lchown(p, 0, 0)
				}
			}
			return nil
		})
		err = releaseTAPs(uid)
	}
	if rerr := os.RemoveAll(jl.dir); rerr != nil {
		return fmt.Errorf("removing jail %s: %w", jl.dir, rerr)
	}
	return err
}

// releaseTAPs gives every TAP device uid owns back to root.
func releaseTAPs(uid int) error {
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("listing TAP devices to take back from user %d: %w", uid, err)
	}
	for _, l := range links {
		if t, ok := l.(*netlink.Tuntap); ok && int(t.Owner) == uid {
			if err := setTAPOwner(t.Name, 0, 0); err != nil {
				return fmt.Errorf("taking TAP device %s back from user %d: %w", t.Name, uid, err)
			}
		}
	}
	return nil
}

// setTAPOwner gives the persistent TAP device name to uid:gid, so that a process of
// theirs may attach to it (TUNSETOWNER, as `ip tuntap ... user` does).
func setTAPOwner(name string, uid, gid int) error {
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("opening /dev/net/tun: %w", err)
	}
	defer f.Close()
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return errdefs.Wrap(errdefs.ErrInvalid, err, "tap device name %q", name)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	fd := int(f.Fd())
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("attaching to tap device %s: %w", name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOWNER, uid); err != nil {
		return fmt.Errorf("giving tap device %s to user %d: %w", name, uid, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETGROUP, gid); err != nil {
		return fmt.Errorf("giving tap device %s to group %d: %w", name, gid, err)
	}
	return nil
}
