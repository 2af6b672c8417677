package assets

import (
	"bufio"
	"bytes"
	"context"
	"crypto/md5"
	_ "embed"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// KernelConfig is kiln's guest kernel configuration: options applied on top of
// `make allnoconfig` (see the file's own comments).
//
//go:embed kernel/kiln-6.1.config
var KernelConfig []byte

// KernelSource is Debian's kernel source tarball that kiln's guest kernel is built from;
// the package is linux-source-6.1, so security fixes arrive with apt.
const (
	KernelSource        = "/usr/src/linux-source-6.1.tar.xz"
	KernelSourcePackage = "linux-source-6.1"
	// kernelRecipe changes when the way the kernel is built changes.
	kernelRecipe = "v1"
)

// KernelNeed is a kernel option kiln's guests cannot do without, and why.
type KernelNeed struct{ Option, Why string }

// AgentNeeds are the options every kernel config kiln builds must set: without one a
// guest hangs or its agent never answers, so the build fails first, naming it.
var AgentNeeds = []KernelNeed{
	{"CONFIG_PVH", "QEMU boots the ELF vmlinux through its PVH entry"},
	{"CONFIG_BLK_DEV_INITRD", "kiln-init runs from an initramfs"},
	{"CONFIG_DEVTMPFS", "kiln-init finds the disks in /dev"},
	{"CONFIG_SERIAL_8250_CONSOLE", "the console log is the first serial port"},
	{"CONFIG_VIRTIO_MMIO", "every device of a microVM is virtio over MMIO"},
	{"CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "Firecracker names its devices on the kernel command line"},
	{"CONFIG_VIRTIO_BLK", "the root filesystem and volumes are virtio disks"},
	{"CONFIG_VIRTIO_CONSOLE", "the agent's channel under QEMU is a virtio-serial port"},
	{"CONFIG_VIRTIO_VSOCKETS", "the agent's channel under Firecracker is vsock"},
	{"CONFIG_VIRTIO_NET", "machines on a private network have a virtio NIC"},
	{"CONFIG_EXT4_FS", "the root filesystem and volumes are ext4"},
	{"CONFIG_OVERLAY_FS", "the guest's writable root is an overlay"},
	{"CONFIG_TMPFS", "the overlay's upper layer is a tmpfs"},
	{"CONFIG_TMPFS_XATTR", "the overlay keeps whiteouts and opaque directories in the tmpfs's xattrs"},
	{"CONFIG_UNIX98_PTYS", "exec with a terminal needs a pty"},
	{"CONFIG_SERIO_I8042", "both VMMs stop a guest with Ctrl-Alt-Del on the i8042"},
	{"CONFIG_KEYBOARD_ATKBD", "the i8042's Ctrl-Alt-Del arrives through the AT keyboard driver"},
	{"CONFIG_VT", "the VT keyboard layer turns Ctrl-Alt-Del into SIGINT for kiln-init"},
	{"CONFIG_CGROUPS", "kiln-init mounts cgroup2 and runc limits build steps with it"},
	{"CONFIG_NAMESPACES", "runc runs build steps in namespaces"},
	{"CONFIG_SECCOMP_FILTER", "runc runs build steps under seccomp"},
}

// KernelBuild says how to build kiln's guest kernel.
type KernelBuild struct {
	// Dir is the asset cache; the kernel is written there and built in a temporary
	// directory under it.
	Dir string
	// Config is the configuration fragment; nil means KernelConfig. ConfigName names it
	// in errors.
	Config     []byte
	ConfigName string
	// Source is the kernel source tarball; "" means KernelSource.
	Source string
	// Jobs is make's -j; 0 means the number of CPUs.
	Jobs int
	Log  io.Writer
}

func (b KernelBuild) withDefaults() KernelBuild {
	if b.Config == nil {
		b.Config, b.ConfigName = KernelConfig, "kiln's kernel config (internal/assets/kernel/kiln-6.1.config)"
	}
	if b.ConfigName == "" {
		b.ConfigName = "the kernel config"
	}
	if b.Source == "" {
		b.Source = KernelSource
	}
	if b.Jobs <= 0 {
		b.Jobs = runtime.NumCPU()
	}
	if b.Log == nil {
		b.Log = io.Discard
	}
	return b
}

// configKey is the part of a built kernel's name that depends on its config alone.
func configKey(config []byte) string { return hashStrings(kernelRecipe, string(config)) }

// sourceKey identifies a source tarball without reading all of it: a package upgrade
// replaces the file, changing its size or time.
func sourceKey(src string) (string, error) {
	fi, err := os.Stat(src)
	if err != nil {
		return "", err
	}
	return hashStrings(src, strconv.FormatInt(fi.Size(), 10), strconv.FormatInt(fi.ModTime().UnixNano(), 10))[:8], nil
}

// KernelPath is where the kernel for b's config and source is cached.
func (b KernelBuild) KernelPath() (string, error) {
	b = b.withDefaults()
	sk, err := sourceKey(b.Source)
	if err != nil {
		return "", errdefs.Missing("the guest kernel's source ("+b.Source+")", KernelSourcePackage)
	}
	return filepath.Join(b.Dir, "vmlinux-kiln-"+configKey(b.Config)+"-"+sk), nil
}

// BuiltKernel returns the kernel built from config (nil: KernelConfig) in dir: the one
// from the installed source if it is there, else the newest from an earlier source, with
// stale true. "" if none was ever built.
func BuiltKernel(dir string, config []byte) (path string, stale bool) {
	b := KernelBuild{Dir: dir, Config: config}.withDefaults()
	if p, err := b.KernelPath(); err == nil && IsELF(p) {
		return p, false
	}
	matches, _ := filepath.Glob(filepath.Join(dir, "vmlinux-kiln-"+configKey(b.Config)+"-*"))
	sort.Slice(matches, func(i, j int) bool { return modTime(matches[i]).After(modTime(matches[j])) })
	for _, m := range matches {
		if IsELF(m) {
			return m, true
		}
	}
	return "", false
}

func modTime(p string) time.Time {
	fi, err := os.Stat(p)
	if err != nil {
		return time.Time{}
	}
	return fi.ModTime()
}

// ParseKernelConfig reads a config fragment: CONFIG_X=value lines and "# CONFIG_X is not
// set" lines (as "n"); other comments and blank lines are skipped.
func ParseKernelConfig(b []byte) (map[string]string, error) {
	opts := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		l := strings.TrimSpace(sc.Text())
		if rest, ok := strings.CutPrefix(l, "# CONFIG_"); ok && strings.HasSuffix(rest, " is not set") {
			opts["CONFIG_"+strings.TrimSuffix(rest, " is not set")] = "n"
			continue
		}
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if !ok || !strings.HasPrefix(k, "CONFIG_") || strings.ContainsAny(k, " \t") {
			return nil, errdefs.Invalid("line %d, %q: write CONFIG_NAME=value or \"# CONFIG_NAME is not set\"", n, l)
		}
		opts[k] = v
	}
	return opts, sc.Err()
}

// CheckKernelConfig refuses a fragment that lacks an option kiln's guests need, naming
// the first one and why it is needed.
func CheckKernelConfig(name string, fragment []byte) error {
	opts, err := ParseKernelConfig(fragment)
	if err != nil {
		return errdefs.Wrap(errdefs.ErrInvalid, err, "%s", name)
	}
	for _, n := range AgentNeeds {
		if opts[n.Option] != "y" {
			return errdefs.Invalid("%s lacks %s=y, which kiln's guests need (%s): add the line and build again", name, n.Option, n.Why)
		}
	}
	if opts["CONFIG_MODULES"] == "y" {
		return errdefs.Invalid("%s sets CONFIG_MODULES=y: kiln's kernel loads no modules (the initramfs carries none); build what the guest needs in (=y)", name)
	}
	return nil
}

// checkResolved compares the .config Kconfig wrote with the fragment: an option the
// fragment asked for that Kconfig dropped (an unmet dependency) fails the build.
func checkResolved(name string, fragment, resolved []byte) error {
	want, err := ParseKernelConfig(fragment)
	if err != nil {
		return err
	}
	got, err := ParseKernelConfig(resolved)
	if err != nil {
		return fmt.Errorf("reading the resolved .config: %w", err)
	}
	keys := make([]string, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		w, g := want[k], got[k]
		if g == "" {
			g = "n"
		}
		if w != g {
			return errdefs.Invalid("%s sets %s=%s, but the kernel's Kconfig resolved it to %s (a dependency it needs is off, or the option does not exist in this kernel): set what it depends on, or drop the line", name, k, w, g)
		}
	}
	return nil
}

// BuildKernel builds kiln's guest kernel from Debian's source with b's config, unless
// the cache has it, and returns its path. It takes minutes on a small host; the tree it
// builds in is removed after.
func BuildKernel(ctx context.Context, b KernelBuild) (string, error) {
	b = b.withDefaults()
	if err := CheckKernelConfig(b.ConfigName, b.Config); err != nil {
		return "", err
	}
	dst, err := b.KernelPath()
	if err != nil {
		return "", err
	}
	if IsELF(dst) {
		return dst, nil
	}
	if err := sourceTrusted(b.Source); err != nil {
		return "", err
	}
	for _, tool := range []struct{ bin, pkg string }{{"make", "make"}, {"gcc", "build-essential"}, {"bison", "bison"}, {"flex", "flex"}, {"bc", "bc"}, {"xz", "xz-utils"}, {"tar", "tar"}} {
		if _, err := exec.LookPath(tool.bin); err != nil {
			return "", errdefs.Missing(tool.bin+" (to build the guest kernel)", tool.pkg)
		}
	}
	if err := os.MkdirAll(b.Dir, 0o755); err != nil {
		return "", err
	}
	// Trees of builds a killed kiln left behind (each over a GiB) go first; a build takes
	// minutes, so one untouched for hours is no other kiln's running build.
	old, _ := filepath.Glob(filepath.Join(b.Dir, "kernel-build-*"))
	for _, d := range old {
		// Its change time, not its modification time, which tar sets to the source's.
		if fi, err := os.Lstat(d); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && time.Since(time.Unix(st.Ctim.Unix())) > 3*time.Hour {
				os.RemoveAll(d)
			}
		}
	}
	tree, err := os.MkdirTemp(b.Dir, "kernel-build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tree)
	start := time.Now()
	fmt.Fprintf(b.Log, "building kiln's guest kernel from %s with %d jobs; this takes several minutes, once per kernel config and source\n", b.Source, b.Jobs)
	run := func(what string, args ...string) error {
		cmd := exec.CommandContext(ctx, args[0], args[1:]...)
		cmd.Dir = tree
		// make's children (sub-makes, the compilers) go with it when the build is
		// cancelled: the whole group is killed, and the wait for its output is bounded.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
		cmd.WaitDelay = 10 * time.Second
		var out tailBuffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("%s: %w\n%s", what, err, strings.TrimSpace(out.String()))
		}
		return nil
	}
	if err := run("unpacking "+b.Source, "tar", "-xf", b.Source, "--strip-components=1"); err != nil {
		return "", err
	}
	fragment := filepath.Join(tree, "kiln.config")
	if err := os.WriteFile(fragment, b.Config, 0o644); err != nil {
		return "", err
	}
	if err := run("configuring the kernel", "make", "-s", "allnoconfig", "KCONFIG_ALLCONFIG="+fragment); err != nil {
		return "", err
	}
	resolved, err := os.ReadFile(filepath.Join(tree, ".config"))
	if err != nil {
		return "", err
	}
	if err := checkResolved(b.ConfigName, b.Config, resolved); err != nil {
		return "", err
	}
	if err := run("compiling the kernel", "make", "-j"+strconv.Itoa(b.Jobs), "vmlinux"); err != nil {
		return "", err
	}
	out, err := atomicfile.Create(dst, 0o644)
	if err != nil {
		return "", err
	}
	defer out.Abort()
	if err := copyInto(out.File, filepath.Join(tree, "vmlinux")); err != nil {
		return "", err
	}
	if err := out.Commit(); err != nil {
		return "", err
	}
	fmt.Fprintf(b.Log, "guest kernel ready in %s: %s\n", time.Since(start).Round(time.Second), dst)
	return dst, nil
}

// sourceTrusted refuses a source tarball that someone other than root (or the user
// building) could have replaced: the build runs its Makefile as that user, root in
// `make setup`. The tarball and every directory above
// it must be root's and writable by no one else (a sticky directory, like /tmp, lets no
// one else replace root's entries); the Debian package's own file must also match the
// checksum dpkg recorded for it.
func sourceTrusted(src string) error {
	p, err := filepath.Abs(src)
	if err != nil {
		return err
	}
	for dir := p; ; dir = filepath.Dir(dir) {
		fi, err := os.Lstat(dir)
		if err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "kernel source %s", src)
		}
		st, _ := fi.Sys().(*syscall.Stat_t)
		open := fi.Mode().Perm()&0o022 != 0 && (dir == p || fi.Mode()&os.ModeSticky == 0)
		if st == nil || (st.Uid != 0 && int(st.Uid) != os.Geteuid()) || open || (dir == p && !fi.Mode().IsRegular()) {
			return errdefs.Invalid("kernel source %s: %s is %v, owned by uid %d: the build runs its Makefile as this user, so it and the directories above it must be root's (or this user's) and writable by no one else", src, dir, fi.Mode(), st.Uid)
		}
		if dir == "/" {
			break
		}
	}
	if p != KernelSource {
		return nil
	}
	sums, err := os.ReadFile("/var/lib/dpkg/info/" + KernelSourcePackage + ".md5sums")
	if err != nil {
		return errdefs.Missing("dpkg's checksums of "+KernelSourcePackage, KernelSourcePackage)
	}
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	h := md5.New()
	if _, err := io.Copy(h, f); err != nil {
		return err
	}
	want := strings.TrimPrefix(p, "/")
	for _, l := range strings.Split(string(sums), "\n") {
		if sum, name, ok := strings.Cut(l, "  "); ok && name == want {
			if sum != hex.EncodeToString(h.Sum(nil)) {
				return errdefs.Invalid("kernel source %s does not match the checksum dpkg recorded: reinstall it with `apt-get install --reinstall %s`", src, KernelSourcePackage)
			}
			return nil
		}
	}
	return errdefs.Invalid("dpkg records no checksum for %s: reinstall it with `apt-get install --reinstall %s`", src, KernelSourcePackage)
}

func copyInto(w io.Writer, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(w, f)
	return err
}

// tailBuffer keeps the last 4 KiB written to it: the end of a failed make's output.
type tailBuffer struct{ b []byte }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if len(t.b) > 4096 {
		t.b = append(t.b[:0], t.b[len(t.b)-4096:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string { return string(t.b) }
