// Command kiln-init is PID 1 in every kiln VM. It lives in the initramfs, prepares the
// guest (mounts, modules, the root overlay, disks), then serves the agent protocol to
// the host for as long as the VM runs. It never execs another init: staying PID 1 lets it
// reap every process and turn the VM off cleanly.
//
// Configuration comes from the kernel command line, written by the host:
//
//	kiln.root=UUID            ext4 root filesystem, mounted read-only under an overlay
//	kiln.disk=UUID:/path      an ext4 disk mounted read-write at /path (repeatable)
//	kiln.hostname=NAME
//	kiln.net=MAC,ADDR/PREFIX,GATEWAY  the interface with MAC gets ADDR and a default route
//	kiln.dns=IP kiln.search=DOMAIN    written to /etc/resolv.conf
package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/guest/agent"
)

type config struct {
	root     string
	disks    []disk
	hostname string
	nets     []netConfig
	dns      string
	search   string
}

type disk struct {
	uuid, path string
	// owner, when set, is given an empty filesystem's root directory.
	owner *[2]int
}

var initStart time.Duration

func main() {
	initStart = boottime()
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "kiln-init runs as PID 1 inside a kiln VM; it is not a command to run on a host")
		os.Exit(2)
	}
	if err := boot(); err != nil {
		logf("boot failed: %v", err)
		// Give the console a moment, then turn the VM off so the host sees the failure
		// instead of a VM that never answers.
		time.Sleep(200 * time.Millisecond)
		powerOff()
	}
	select {}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kiln-init: "+format+"\n", args...)
}

func boottime() time.Duration {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	return time.Duration(ts.Nano())
}

func boot() error {
	for _, m := range []struct{ src, dst, fstype string }{
		{"devtmpfs", "/dev", "devtmpfs"},
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
	} {
		os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.fstype, unix.MS_NOSUID, ""); err != nil && err != unix.EBUSY {
			return fmt.Errorf("mounting %s: %w", m.dst, err)
		}
	}
	if con, err := os.OpenFile("/dev/console", os.O_RDWR, 0); err == nil {
		for fd := 0; fd <= 2; fd++ {
			unix.Dup2(int(con.Fd()), fd)
		}
	}
	if err := loadModules("/lib/modules/kiln.order"); err != nil {
		return err
	}
	cfg, err := parseCmdline()
	if err != nil {
		return err
	}
	if err := mountRoot(cfg); err != nil {
		return err
	}
	if cfg.hostname != "" {
		unix.Sethostname([]byte(cfg.hostname))
	}
	loopbackUp()
	if err := setupNetwork(cfg); err != nil {
		return err
	}
	// Ctrl-Alt-Del (Firecracker's SendCtrlAltDel) arrives as SIGINT to PID 1 once the
	// kernel is told not to reboot by itself.
	unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM, unix.SIGPWR)
	go func() { <-sigs; shutdown() }()
	if f := openPowerButton(); f != nil {
		go watchPowerButton(f)
	}

	a := agent.New(agent.NewReaper())
	a.PowerOff = shutdown
	a.Log = logf
	// The root is the overlay whose writes fill guest memory; volumes are the disks.
	a.Mounts = append([]string{"/"}, mounted...)
	a.SetTime = func(ns int64) error {
		ts := unix.NsecToTimespec(ns)
		return unix.ClockSettime(unix.CLOCK_REALTIME, &ts)
	}
	a.Info = func(r *guest.Reply) {
		var u unix.Utsname
		unix.Uname(&u)
		r.Kernel = unix.ByteSliceToString(u.Release[:])
		r.InitStartMS = initStart.Milliseconds()
		r.ReadyMS = readyAt.Milliseconds()
	}
	readyAt = boottime()
	go serveVsock(a)
	go serveSerial(a)
	return nil
}

var readyAt time.Duration

// loadModules loads the modules the initramfs carries, in the order the host wrote
// (modules.dep order, dependencies first).
func loadModules(orderFile string) error {
	b, err := os.ReadFile(orderFile)
	if err != nil {
		return nil // a kernel with everything built in needs no modules
	}
	for _, line := range strings.Fields(string(b)) {
		f, err := os.Open(filepath.Join("/lib/modules", line))
		if err != nil {
			return fmt.Errorf("module %s: %w", line, err)
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && err != unix.EEXIST {
			return fmt.Errorf("loading module %s: %w", line, err)
		}
	}
	return nil
}

func parseCmdline() (config, error) {
	var cfg config
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return cfg, err
	}
	for _, f := range strings.Fields(string(b)) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "kiln.root":
			cfg.root = v
		case "kiln.disk":
			parts := strings.Split(v, ":")
			if len(parts) < 2 || !filepath.IsAbs(parts[1]) {
				return cfg, fmt.Errorf("bad kiln.disk=%q: want UUID:/absolute/path[:UID:GID]", v)
			}
			d := disk{uuid: parts[0], path: parts[1]}
			if len(parts) == 4 {
				var uid, gid int
				if _, err := fmt.Sscan(parts[2]+" "+parts[3], &uid, &gid); err == nil {
					d.owner = &[2]int{uid, gid}
				}
			}
			cfg.disks = append(cfg.disks, d)
		case "kiln.hostname":
			cfg.hostname = v
		case "kiln.net":
			n, err := parseNet(v)
			if err != nil {
				return cfg, err
			}
			cfg.nets = append(cfg.nets, n)
		case "kiln.dns":
			cfg.dns = v
		case "kiln.search":
			cfg.search = v
		}
	}
	if cfg.root == "" {
		return cfg, fmt.Errorf("no kiln.root= on the kernel command line")
	}
	return cfg, nil
}

// ext4UUID reads the filesystem UUID from an ext4 superblock.
func ext4UUID(dev string) string {
	f, err := os.Open(dev)
	if err != nil {
		return ""
	}
	defer f.Close()
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, 1024); err != nil {
		return ""
	}
	if sb[0x38] != 0x53 || sb[0x39] != 0xEF {
		return ""
	}
	u := sb[0x68:0x78]
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// findDisks maps the UUIDs wanted to /dev/vdX. Block devices are matched by filesystem
// UUID, not by name, because virtio-mmio devices are not probed in command-line order.
func findDisks(want map[string]bool, timeout time.Duration) (map[string]string, error) {
	deadline := time.Now().Add(timeout)
	for {
		found := map[string]string{}
		ents, _ := os.ReadDir("/sys/block")
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), "vd") {
				continue
			}
			dev := "/dev/" + e.Name()
			if u := ext4UUID(dev); want[u] {
				found[u] = dev
			}
		}
		if len(found) == len(want) {
			return found, nil
		}
		if time.Now().After(deadline) {
			var missing []string
			for u := range want {
				if found[u] == "" {
					missing = append(missing, u)
				}
			}
			return nil, fmt.Errorf("disks with UUID %s did not appear within %s", strings.Join(missing, ", "), timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func mountRoot(cfg config) error {
	want := map[string]bool{cfg.root: true}
	for _, d := range cfg.disks {
		want[d.uuid] = true
	}
	devs, err := findDisks(want, 20*time.Second)
	if err != nil {
		return err
	}
	for _, d := range []string{"/mnt/lower", "/mnt/rw", "/mnt/root"} {
		os.MkdirAll(d, 0o755)
	}
	if err := unix.Mount(devs[cfg.root], "/mnt/lower", "ext4", unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("mounting root %s: %w", devs[cfg.root], err)
	}
	// The writable layer is memory: a VM's changes to its root are gone when it stops,
	// and starting a VM copies nothing. Persistent data belongs on a disk.
	if err := unix.Mount("tmpfs", "/mnt/rw", "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("mounting writable layer: %w", err)
	}
	os.MkdirAll("/mnt/rw/upper", 0o755)
	os.MkdirAll("/mnt/rw/work", 0o755)
	if err := unix.Mount("overlay", "/mnt/root", "overlay", 0,
		"lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work"); err != nil {
		return fmt.Errorf("mounting root overlay: %w", err)
	}
	for _, d := range cfg.disks {
		mp := filepath.Join("/mnt/root", d.path)
		if err := os.MkdirAll(mp, 0o755); err != nil {
			return fmt.Errorf("creating mount point %s: %w", d.path, err)
		}
		if err := unix.Mount(devs[d.uuid], mp, "ext4", 0, ""); err != nil {
			return fmt.Errorf("mounting disk %s at %s: %w", devs[d.uuid], d.path, err)
		}
		if d.owner != nil && emptyFS(mp) {
			os.Chown(mp, d.owner[0], d.owner[1])
		}
		mounted = append(mounted, d.path)
	}
	for _, d := range []string{"/dev", "/proc", "/sys"} {
		os.MkdirAll("/mnt/root"+d, 0o755)
		if err := unix.Mount(d, "/mnt/root"+d, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("moving %s: %w", d, err)
		}
	}
	// switch_root without exec: move the new root over / and chroot into it; this
	// process stays PID 1.
	if err := unix.Chdir("/mnt/root"); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("moving root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	unix.Chdir("/")
	os.MkdirAll("/dev/pts", 0o755)
	unix.Mount("devpts", "/dev/pts", "devpts", unix.MS_NOSUID|unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
	if _, err := os.Lstat("/dev/ptmx"); err != nil {
		os.Symlink("pts/ptmx", "/dev/ptmx")
	}
	os.MkdirAll("/dev/shm", 0o1777)
	unix.Mount("tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777")
	os.MkdirAll("/run", 0o755)
	unix.Mount("tmpfs", "/run", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755")
	// cgroup v2, for container runtimes in the guest (runc under buildkitd).
	os.MkdirAll("/sys/fs/cgroup", 0o755)
	unix.Mount("cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	return nil
}

var mounted []string

// emptyFS reports whether a freshly mounted filesystem holds nothing but lost+found and
// its root is still root's: a new volume, never used.
func emptyFS(dir string) bool {
	var st unix.Stat_t
	if unix.Stat(dir, &st) != nil || st.Uid != 0 {
		return false
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range ents {
		if e.Name() != "lost+found" {
			return false
		}
	}
	return true
}

func loopbackUp() {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// serveSerial serves the agent on the virtio-serial port named guest.PortName.
func serveSerial(a *agent.Agent) {
	var dev string
	for i := 0; dev == ""; i++ {
		ents, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, n := range ents {
			b, _ := os.ReadFile(n)
			if strings.TrimSpace(string(b)) == guest.PortName {
				dev = "/dev/" + filepath.Base(filepath.Dir(n))
			}
		}
		if dev == "" {
			if i == 500 {
				return // no serial port: this VMM uses vsock
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// The port stays open for the VM's life: closing it would drop bytes the host sent.
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		logf("opening %s: %v", dev, err)
		return
	}
	if err := a.ServeLink(context.Background(), f, true); err != nil {
		logf("agent on %s: %v", dev, err)
	}
}

func serveVsock(a *agent.Agent) {
	l, err := listenVsock(guest.VsockPort)
	if err != nil {
		return // no vsock device: this VMM uses virtio-serial
	}
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			a.ServeLink(context.Background(), c, false)
		}()
	}
}

// openPowerButton opens the ACPI power button's input device, which QEMU's
// system_powerdown presses. It is opened before the agent answers, so that a stop sent
// right after boot is not lost. Without ACPI (Firecracker) there is none to wait for.
func openPowerButton() *os.File {
	acpi, _ := filepath.Glob("/sys/bus/acpi/devices/PNP0C0C:*")
	if len(acpi) == 0 {
		return nil
	}
	// The input device appears asynchronously after the button module binds.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		names, _ := filepath.Glob("/sys/class/input/event*/device/name")
		for _, n := range names {
			if b, _ := os.ReadFile(n); strings.TrimSpace(string(b)) == "Power Button" {
				dev := "/dev/input/" + filepath.Base(filepath.Dir(filepath.Dir(n)))
				if f, err := os.Open(dev); err == nil {
					return f
				}
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	logf("the ACPI power button did not appear; stop requests from the VMM will not power off")
	return nil
}

// watchPowerButton turns the VM off on KEY_POWER.
func watchPowerButton(f *os.File) {
	r := bufio.NewReader(f)
	ev := make([]byte, 24) // struct input_event on 64-bit
	for {
		if _, err := io.ReadFull(r, ev); err != nil {
			return
		}
		typ := uint16(ev[16]) | uint16(ev[17])<<8
		code := uint16(ev[18]) | uint16(ev[19])<<8
		if typ == 1 && code == 116 { // EV_KEY, KEY_POWER
			shutdown()
		}
	}
}

// shutdown stops every process, flushes and unmounts disks, and turns the VM off.
func shutdown() {
	unix.Kill(-1, unix.SIGTERM)
	time.Sleep(100 * time.Millisecond)
	unix.Kill(-1, unix.SIGKILL)
	unix.Sync()
	for i := len(mounted) - 1; i >= 0; i-- {
		if err := unix.Unmount(mounted[i], 0); err != nil {
			unix.Mount("", mounted[i], "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
		}
	}
	unix.Sync()
	powerOff()
}

// powerOff ends the VM. Both VMMs are started so that a guest reboot ends the VMM
// process (QEMU -no-reboot, Firecracker's i8042 reset), which works without ACPI.
func powerOff() {
	unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	select {}
}
