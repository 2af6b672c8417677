package assets

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// GuestModules are the modules kiln-init needs from a stock distribution kernel, by name.
// Dependencies are added from modules.dep; modules built into the kernel are skipped.
var GuestModules = []string{
	"virtio_mmio", "virtio_console", "virtio_blk", // devices on QEMU microvm and Firecracker
	"crc32c_generic", "ext4", "overlay", // root overlay and disks
	"vmw_vsock_virtio_transport", // the agent channel under Firecracker
	"evdev", "button",            // ACPI power button: QEMU's graceful stop
	"virtio_net", // machines on a private network
}

func modName(path string) string {
	b := filepath.Base(path)
	b = strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(b, ".xz"), ".zst"), ".ko")
	return strings.ReplaceAll(b, "-", "_")
}

// ResolveModules returns the relative paths (under modDir) of the wanted modules and
// their dependencies, each after everything it depends on. Names built into the kernel
// (modules.builtin) need no file and are left out.
func ResolveModules(modDir string, want []string) ([]string, error) {
	deps := map[string][]string{} // path → dependency paths
	byName := map[string]string{}
	f, err := os.Open(filepath.Join(modDir, "modules.dep"))
	if err != nil {
		return nil, fmt.Errorf("reading modules.dep: %w (is the kernel's module tree at %s?)", err, modDir)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		path, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		deps[path] = strings.Fields(rest)
		byName[modName(path)] = path
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			builtin[modName(l)] = true
		}
	}
	var order []string
	seen := map[string]bool{}
	var visit func(p string)
	visit = func(p string) {
		if seen[p] {
			return
		}
		seen[p] = true
		for _, d := range deps[p] {
			visit(d)
		}
		order = append(order, p)
	}
	for _, n := range want {
		p, ok := byName[n]
		if !ok {
			if builtin[n] {
				continue
			}
			return nil, fmt.Errorf("kernel module %s is neither in %s/modules.dep nor built in", n, modDir)
		}
		visit(p)
	}
	return order, nil
}
