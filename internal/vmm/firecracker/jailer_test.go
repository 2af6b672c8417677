package firecracker

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/vmm"
)

func owner(t *testing.T, p string) (uint32, uint64) {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return st.Uid, st.Ino
}

// TestJailerCommand: the jail is laid out as docs/jailer.md says, the VM's files are in
// it for the VM's user (shared read-only files linked as they are, a private one copied, a
// volume handed over), and release gives the volume back to root and removes the jail.
func TestJailerCommand(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("making a jail needs root")
	}
	dir := t.TempDir()
	for f, mode := range map[string]os.FileMode{"vmlinux": 0o644, "initramfs.cpio": 0o644, "root.ext4": 0o644, "secret.ext4": 0o600, "data.ext4": 0o600} {
		os.WriteFile(filepath.Join(dir, f), []byte(f), mode)
	}
	const uid, gid = 4242, 4242
	j := &Jailer{Binary: "/bin/true", ChrootBase: filepath.Join(dir, "jail")}
	cfg := vmm.Config{ID: "vm1", Kernel: filepath.Join(dir, "vmlinux"), Initramfs: filepath.Join(dir, "initramfs.cpio"),
		Disks: []vmm.Disk{{Path: filepath.Join(dir, "root.ext4"), ReadOnly: true}, {Path: filepath.Join(dir, "secret.ext4"), ReadOnly: true},
			{Path: filepath.Join(dir, "data.ext4")}},
		Confine: vmm.Confine{UID: uid, GID: gid, Cgroup: "kiln/vm1"}}
	cmd, jl, err := j.command("/usr/bin/firecracker", cfg)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "jail", "firecracker", "vm1", "root")
	if jl.root != root || jl.host(jailedAPISock) != filepath.Join(root, "run", "firecracker.socket") {
		t.Errorf("jail root %s, api socket %s", jl.root, jl.host(jailedAPISock))
	}
	want := "--id vm1 --exec-file /usr/bin/firecracker --uid 4242 --gid 4242 --chroot-base-dir " + filepath.Join(dir, "jail") + " -- --api-sock /run/firecracker.socket"
	if got := strings.Join(cmd.Args[1:], " "); got != want {
		t.Errorf("jailer args:\n got %s\nwant %s", got, want)
	}
	for _, d := range []string{"run", "snapshot"} {
		if u, _ := owner(t, filepath.Join(root, d)); u != uid {
			t.Errorf("%s in the jail belongs to %d, want %d", d, u, uid)
		}
	}
	for f, how := range map[string]string{"vmlinux": "linked", "initramfs.cpio": "linked", "root.ext4": "linked", "secret.ext4": "copied", "data.ext4": "handed over"} {
		b, err := os.ReadFile(filepath.Join(root, inside(f)))
		if err != nil || string(b) != f {
			t.Errorf("%s not in the jail: %v", f, err)
			continue
		}
		hu, hino := owner(t, filepath.Join(dir, f))
		ju, jino := owner(t, filepath.Join(root, f))
		switch how {
		case "linked":
			if hino != jino || hu != 0 {
				t.Errorf("%s: jail inode %d, host %d owned by %d; want the same, still root's", f, jino, hino, hu)
			}
		case "copied":
			if hino == jino || ju != uid || hu != 0 {
				t.Errorf("%s (0600, shared): want a copy owned by %d, the original root's", f, uid)
			}
		case "handed over":
			if hino != jino || hu != uid {
				t.Errorf("%s (read-write): want the same file, owned by %d; owner %d", f, uid, hu)
			}
		}
	}
	if err := jl.release(); err != nil {
		t.Fatal(err)
	}
	if u, _ := owner(t, filepath.Join(dir, "data.ext4")); u != 0 {
		t.Errorf("the volume still belongs to %d after the jail was released", u)
	}
	if _, err := os.Stat(jl.dir); !os.IsNotExist(err) {
		t.Errorf("jail left behind: %v", err)
	}
	cfg.Confine = vmm.Confine{}
	if _, _, err := j.command("/usr/bin/firecracker", cfg); err == nil {
		t.Error("a jail for root was made")
	}
}

// TestTAPOwner: a TAP device is handed to the VM's user, as a jailed Firecracker needs
// to attach to it. It runs in network and mount namespaces of its own.
// A VM's TAP device is its user's while the VM runs and root's again once its jail is
// released.
func TestTAPOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("TAP devices need root")
	}
	sysfs, jails := t.TempDir(), t.TempDir()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread, in its namespaces, ends with this goroutine
		errc <- func() error {
			if err := unix.Unshare(unix.CLONE_NEWNET | unix.CLONE_NEWNS); err != nil {
				return err
			}
			unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, "")
			// A sysfs mounted here shows this namespace's devices.
			if err := unix.Mount("sysfs", sysfs, "sysfs", 0, ""); err != nil {
				return err
			}
			defer unix.Unmount(sysfs, unix.MNT_DETACH)
			f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			ifr, _ := unix.NewIfreq("kilntap0")
			ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
			if err := unix.IoctlIfreq(int(f.Fd()), unix.TUNSETIFF, ifr); err != nil {
				return err
			}
			if err := unix.IoctlSetInt(int(f.Fd()), unix.TUNSETPERSIST, 1); err != nil {
				return err
			}
			f.Close()
			if err := setTAPOwner("kilntap0", 4242, 4243); err != nil {
				return err
			}
			check := func(owner, group string) error {
				for file, want := range map[string]string{"owner": owner, "group": group} {
					b, err := os.ReadFile(filepath.Join(sysfs, "class/net/kilntap0", file))
					if err != nil || strings.TrimSpace(string(b)) != want {
						return fmt.Errorf("tap %s = %q (%v), want %s", file, b, err, want)
					}
				}
				return nil
			}
			if err := check("4242", "4243"); err != nil {
				return err
			}
			// Releasing the jail of the VM that user 4242 ran gives its TAP device back to
			// root: the next VM given uid 4242 must not attach to it.
			jl := &jail{dir: filepath.Join(jails, "vm1")}
			jl.root = filepath.Join(jl.dir, "root")
			if err := os.MkdirAll(jl.root, 0o700); err != nil {
				return err
			}
			os.Chown(jl.root, 4242, 4243)
			if err := jl.release(); err != nil {
				return err
			}
			if _, err := os.Stat(jl.dir); !os.IsNotExist(err) {
				return fmt.Errorf("the jail is still there: %v", err)
			}
			return check("0", "0")
		}()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// A jail whose VM was never recorded (kiln died right after starting it) is released
// by the reaper through Release: the volume lent to the VM's user is root's again.
func TestReleaseWithoutHandle(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	base := t.TempDir()
	d := &Driver{Binary: "/bin/true", Jailer: &Jailer{ChrootBase: base}}
	jl := d.Jailer.jail("/bin/true", "vm1")
	if err := os.MkdirAll(jl.root, 0o700); err != nil {
		t.Fatal(err)
	}
	os.Chown(jl.root, 4242, 4242)
	vol := filepath.Join(base, "data.ext4")
	os.WriteFile(vol, []byte("volume"), 0o600)
	if err := linkIn(vol, jl.host("data.ext4"), true, 4242, 4242); err != nil {
		t.Fatal(err)
	}
	if uid, _ := owner(t, vol); uid != 4242 {
		t.Fatalf("the volume was not lent to the VM's user: %d", uid)
	}
	if err := d.Release("vm1"); err != nil {
		t.Fatal(err)
	}
	if uid, _ := owner(t, vol); uid != 0 {
		t.Errorf("the volume still belongs to user %d", uid)
	}
	if _, err := os.Stat(jl.dir); !os.IsNotExist(err) {
		t.Errorf("the jail is still there: %v", err)
	}
	if err := d.Release("never-ran"); err != nil {
		t.Errorf("releasing a VM without a jail: %v", err)
	}
}
