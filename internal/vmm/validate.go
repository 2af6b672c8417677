package vmm

import (
	"bufio"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// MinMemoryMiB is the least memory a kiln guest boots with: the kernel, the initramfs
// unpacked, and kiln-init.
const MinMemoryMiB = 128

// HostMemoryMiB is the host's total memory.
func HostMemoryMiB() int {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return kb / 1024
		}
	}
	return 0
}

// Validate checks a Config against the host. Errors name the field and the allowed range.
func Validate(cfg Config) error {
	if err := CheckSize(cfg.CPUs, cfg.MemoryMiB, "cpus", "memory"); err != nil {
		return err
	}
	if cfg.Dir == "" || !filepath.IsAbs(cfg.Dir) {
		return errdefs.Invalid("vm directory %q must be an absolute path", cfg.Dir)
	}
	if _, err := os.Stat(cfg.Kernel); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalid, err, "kernel %s", cfg.Kernel)
	}
	return nil
}

// CheckSize is the one rule for a VM's size on this host: cpus and memory in MiB.
// Errors name the value by the caller's field names (cpus and memory for a VM; the
// config's fields for a machine) and give the range allowed.
func CheckSize(cpus, memoryMiB int, cpusField, memoryField string) error {
	if n := runtime.NumCPU(); cpus < 1 || cpus > n {
		return errdefs.Invalid("%s=%d is out of range: this host allows 1 to %d", cpusField, cpus, n)
	}
	maxMem := HostMemoryMiB() - 256
	if memoryMiB < MinMemoryMiB || (maxMem > 0 && memoryMiB > maxMem) {
		return errdefs.Invalid("%s=%d MiB is out of range: this host allows %d to %d MiB", memoryField, memoryMiB, MinMemoryMiB, maxMem)
	}
	return nil
}

// CheckMountPath is the one rule for where a disk is mounted in a guest.
func CheckMountPath(p string) error {
	if !filepath.IsAbs(p) || strings.ContainsAny(p, " :\t\n") {
		return errdefs.Invalid("mount point %q must be an absolute path without spaces or colons, like /data", p)
	}
	if filepath.Clean(p) == "/" {
		return errdefs.Invalid("a disk cannot be mounted at /: the root filesystem is the image")
	}
	return nil
}
