package assets_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/assets"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// The config in the repo sets everything kiln's guests need, and loads no modules.
func TestKernelConfigInRepo(t *testing.T) {
	if err := assets.CheckKernelConfig("kiln-6.1.config", assets.KernelConfig); err != nil {
		t.Fatal(err)
	}
	opts, _ := assets.ParseKernelConfig(assets.KernelConfig)
	for k, want := range map[string]string{"CONFIG_MODULES": "n", "CONFIG_PCI": "n", "CONFIG_ACPI": "n", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "y"} {
		if opts[k] != want {
			t.Errorf("%s=%q, want %s", k, opts[k], want)
		}
	}
}

func without(config []byte, option string) []byte {
	var keep []string
	for _, l := range strings.Split(string(config), "\n") {
		if !strings.HasPrefix(l, option+"=") {
			keep = append(keep, l)
		}
	}
	return []byte(strings.Join(keep, "\n"))
}

// fakeSource writes a kernel source tarball whose Makefile stands in for Kconfig and the
// compiler: allnoconfig copies the fragment less the lines matching drop (an option
// Kconfig turned off), vmlinux is an ELF, and every build is counted in builds.
func fakeSource(t *testing.T, drop string) (tarball, builds string) {
	dir := t.TempDir()
	tree := filepath.Join(dir, "linux-source-6.1")
	os.MkdirAll(tree, 0o755)
	builds = filepath.Join(dir, "builds")
	filter := "cat $(KCONFIG_ALLCONFIG)"
	if drop != "" {
		filter = "grep -v '" + drop + "' $(KCONFIG_ALLCONFIG)"
	}
	mk := "allnoconfig:\n\t" + filter + " > .config\n\nvmlinux:\n\techo built >> " + builds + "\n\tcp /bin/true vmlinux\n"
	if err := os.WriteFile(filepath.Join(tree, "Makefile"), []byte(mk), 0o644); err != nil {
		t.Fatal(err)
	}
	tarball = filepath.Join(dir, "linux-source-6.1.tar")
	if out, err := exec.Command("tar", "-cf", tarball, "-C", dir, "linux-source-6.1").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v %s", err, out)
	}
	return tarball, builds
}

func noBuildTrees(t *testing.T, dir string) {
	t.Helper()
	if left, _ := filepath.Glob(filepath.Join(dir, "kernel-build-*")); len(left) > 0 {
		t.Errorf("build trees left behind: %v", left)
	}
}

// A config that lacks an option kiln's guests need fails before anything is built,
// naming the option and why it is needed.
func TestKernelConfigLackingAnAgentNeedFails(t *testing.T) {
	dir := t.TempDir()
	src, builds := fakeSource(t, "")
	bad := without(assets.KernelConfig, "CONFIG_VIRTIO_VSOCKETS")
	_, err := assets.BuildKernel(context.Background(), assets.KernelBuild{Dir: dir, Source: src, Config: bad, ConfigName: "my.config"})
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "my.config lacks CONFIG_VIRTIO_VSOCKETS=y") || !strings.Contains(err.Error(), "vsock") {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(builds); err == nil {
		t.Error("the kernel was compiled anyway")
	}
	// Modules are refused too: the initramfs of kiln's kernel carries none.
	mods := append(append([]byte{}, assets.KernelConfig...), "\nCONFIG_MODULES=y\n"...)
	if err := assets.CheckKernelConfig("my.config", mods); err == nil || !strings.Contains(err.Error(), "CONFIG_MODULES=y") {
		t.Errorf("modules: %v", err)
	}
	if err := assets.CheckKernelConfig("my.config", []byte("CONFIG_VIRTIO_MMIO y\n")); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("a malformed line: %v", err)
	}
}

// An option the config sets that Kconfig drops (an unmet dependency) fails the build,
// naming it, instead of a kernel that hangs at boot.
func TestKernelOptionDroppedByKconfigFails(t *testing.T) {
	dir := t.TempDir()
	src, builds := fakeSource(t, "CONFIG_OVERLAY_FS")
	_, err := assets.BuildKernel(context.Background(), assets.KernelBuild{Dir: dir, Source: src})
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "sets CONFIG_OVERLAY_FS=y, but the kernel's Kconfig resolved it to n") {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(builds); err == nil {
		t.Error("the kernel was compiled anyway")
	}
	noBuildTrees(t, dir)
}

// A kernel is built once per config and source: the second call finds it in the cache,
// a changed config builds another.
func TestKernelCachedByConfigHash(t *testing.T) {
	dir := t.TempDir()
	src, builds := fakeSource(t, "")
	b := assets.KernelBuild{Dir: dir, Source: src, Jobs: 1}
	p1, err := assets.BuildKernel(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	p2, err := assets.BuildKernel(context.Background(), b)
	if err != nil || p2 != p1 || !assets.IsELF(p1) {
		t.Fatalf("second build: %s %v (first %s)", p2, err, p1)
	}
	// Built from another source than the installed one, it is still found for its
	// config, as stale: a server boots it and asks for a rebuild.
	if got, stale := assets.BuiltKernel(dir, nil); got != p1 || !stale {
		t.Errorf("BuiltKernel = %s %v, want %s as stale", got, stale, p1)
	}
	b.Config = append(append([]byte{}, assets.KernelConfig...), "\nCONFIG_IKCONFIG=y\n"...)
	p3, err := assets.BuildKernel(context.Background(), b)
	if err != nil || p3 == p1 {
		t.Fatalf("changed config: %s %v", p3, err)
	}
	if n, _ := os.ReadFile(builds); strings.Count(string(n), "built") != 2 {
		t.Errorf("compiled %d times, want 2 (one per config)", strings.Count(string(n), "built"))
	}
	noBuildTrees(t, dir)
}

// The build runs the source's Makefile as root: a tarball that another user could have
// replaced is refused, naming it.
func TestKernelSourceOthersCouldWriteIsRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the check wants root's files")
	}
	src, builds := fakeSource(t, "")
	os.Chmod(src, 0o664)
	_, err := assets.BuildKernel(context.Background(), assets.KernelBuild{Dir: t.TempDir(), Source: src})
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), src) || !strings.Contains(err.Error(), "writable by no one else") {
		t.Fatalf("err = %v", err)
	}
	os.Chmod(src, 0o644)
	os.Chown(src, 4242, 4242)
	if _, err := assets.BuildKernel(context.Background(), assets.KernelBuild{Dir: t.TempDir(), Source: src}); err == nil || !strings.Contains(err.Error(), "uid 4242") {
		t.Fatalf("a tarball of another user's: %v", err)
	}
	if _, err := os.Stat(builds); err == nil {
		t.Error("the kernel was compiled anyway")
	}
}
