package assets

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/volume"
)

// Set is one VM's boot assets, all read-only and shareable between VMs.
type Set struct {
	Kernel    string
	Initramfs string
	Rootfs    string
	// KernelName says which kernel this is, for logs and reports: "kiln" (built from
	// kiln's config), "debian" (the host's), or the path given.
	KernelName string
	// KernelNoACPI says the kernel has no ACPI (kiln's own, or a custom one without
	// acpi_init): it finds its devices on the command line.
	KernelNoACPI bool
}

// Kernel choices besides a path.
const (
	// KernelKiln is kiln's own guest kernel, built by `kiln assets build`: every driver
	// built in, so the initramfs carries no modules.
	KernelKiln = "kiln"
	// KernelDebian is the host's Debian kernel (/boot/vmlinuz-*) with its modules.
	KernelDebian = "debian"
)

// Options say where assets come from.
type Options struct {
	// Dir caches built assets (DATA_DIR/assets).
	Dir string
	// Kernel picks the guest kernel: "" or KernelKiln for kiln's own (Debian's when it
	// is not built, saying so on Log), KernelDebian for the host's newest Debian kernel
	// (/boot/vmlinuz-*), or a path: an ELF vmlinux, or a bzImage with an XZ payload.
	Kernel string
	// ModulesDir is the module tree matching the kernel; empty means
	// /lib/modules/RELEASE for a Debian kernel. A custom kernel with everything built in
	// needs none.
	ModulesDir string
	// Init is the kiln-init binary.
	Init string
	// Log receives progress lines for slow steps.
	Log io.Writer
	// BuildRootfs allows building the root filesystem if it is missing (minutes, needs
	// root and the Debian mirror). When false a missing rootfs is an error naming
	// `make setup`.
	BuildRootfs bool
	// BuildKernel allows building kiln's guest kernel if it is missing (minutes).
	BuildKernel bool
	// KernelJobs is the kernel build's make -j; 0 is the number of CPUs.
	KernelJobs int
	// Mirror is the Debian mirror for debootstrap.
	Mirror string
}

// RootfsSuite and RootfsVariant define the default root filesystem; changing them changes
// its cache key.
const (
	RootfsSuite   = "bookworm"
	RootfsVariant = "minbase"
	rootfsRecipe  = "v1"
)

// Ensure returns the asset set, building what is missing.
func Ensure(ctx context.Context, o Options) (Set, error) {
	if o.Log == nil {
		o.Log = io.Discard
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return Set{}, err
	}
	var s Set
	kernel, modDir, err := o.kernel(ctx)
	if err != nil {
		return s, err
	}
	s.KernelName = KernelDebian
	switch {
	case strings.HasPrefix(filepath.Base(kernel), "vmlinux-kiln-"):
		s.KernelName = KernelKiln
	case o.Kernel != "" && o.Kernel != KernelKiln && o.Kernel != KernelDebian:
		s.KernelName = o.Kernel
	}
	if s.Kernel, err = o.ensureVmlinux(kernel); err != nil {
		return s, err
	}
	s.KernelNoACPI = s.KernelName == KernelKiln || (s.KernelName != KernelDebian && !hasSymbol(s.Kernel, "acpi_init"))
	if s.Initramfs, err = o.ensureInitramfs(modDir); err != nil {
		return s, err
	}
	if s.Rootfs, err = o.ensureRootfs(ctx); err != nil {
		return s, err
	}
	return s, nil
}

func (o Options) kernel(ctx context.Context) (path, modDir string, err error) {
	switch o.Kernel {
	case "", KernelKiln:
		if o.BuildKernel {
			p, err := BuildKernel(ctx, KernelBuild{Dir: o.Dir, Jobs: o.KernelJobs, Log: o.Log})
			return p, "", err
		}
		if p, stale := BuiltKernel(o.Dir, nil); p != "" {
			if stale {
				fmt.Fprintf(o.Log, "kiln: the guest kernel %s was built from an earlier %s: run `kiln assets build` (or `make setup`) to rebuild it from the installed source\n", filepath.Base(p), KernelSourcePackage)
			}
			return p, "", nil
		}
		if o.Kernel == KernelKiln {
			return "", "", errdefs.New(errdefs.ErrMissingDependency, "kiln's guest kernel is not built yet: run `make setup` (or `kiln assets build`), or choose --kernel debian")
		}
		fmt.Fprintf(o.Log, "kiln: kiln's guest kernel is not built (run `make setup`); booting the host's Debian kernel, which boots slower and cannot boot under Firecracker\n")
	case KernelDebian:
	default:
		if _, err := os.Stat(o.Kernel); err != nil {
			return "", "", errdefs.Wrap(errdefs.ErrInvalid, err, "kernel %s (give kiln, debian or the path of a vmlinux)", o.Kernel)
		}
		return o.Kernel, o.ModulesDir, nil
	}
	path, release, err := DebianKernel("/boot")
	if err != nil {
		return "", "", err
	}
	modDir = o.ModulesDir
	if modDir == "" {
		modDir = filepath.Join("/lib/modules", release)
	}
	return path, modDir, nil
}

func (o Options) ensureVmlinux(src string) (string, error) {
	if IsELF(src) {
		return src, nil
	}
	sum, err := hashFile(src)
	if err != nil {
		return "", fmt.Errorf("reading kernel: %w", err)
	}
	dst := filepath.Join(o.Dir, "vmlinux-"+sum[:16])
	if IsELF(dst) {
		return dst, nil
	}
	fmt.Fprintf(o.Log, "extracting vmlinux from %s\n", src)
	if err := ExtractVmlinux(src, dst); err != nil {
		return "", err
	}
	return dst, nil
}

func (o Options) ensureInitramfs(modDir string) (string, error) {
	if o.Init == "" {
		return "", errdefs.New(errdefs.ErrMissingDependency, "kiln-init binary not found: build it with `make build` (it is looked for beside the kiln binary, or set KILN_INIT)")
	}
	initSum, err := hashFile(o.Init)
	if err != nil {
		return "", fmt.Errorf("reading kiln-init: %w", err)
	}
	var mods []string
	if modDir != "" {
		if mods, err = ResolveModules(modDir, GuestModules); err != nil {
			return "", err
		}
	}
	key := []string{initSum, modDir}
	for _, m := range mods {
		fi, err := os.Stat(filepath.Join(modDir, m))
		if err != nil {
			return "", err
		}
		key = append(key, m, fmt.Sprint(fi.Size(), fi.ModTime().UnixNano()))
	}
	dst := filepath.Join(o.Dir, "initramfs-"+hashStrings(key...)+".cpio")
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	if err := WriteInitramfs(dst, o.Init, modDir, mods); err != nil {
		return "", fmt.Errorf("writing initramfs: %w", err)
	}
	return dst, nil
}

// RootfsPath is where the default root filesystem is cached.
func RootfsPath(dir string) string {
	return filepath.Join(dir, "rootfs-"+hashStrings(RootfsSuite, RootfsVariant, rootfsRecipe)+".ext4")
}

func (o Options) ensureRootfs(ctx context.Context) (string, error) {
	dst := RootfsPath(o.Dir)
	if _, err := volume.Inspect(dst); err == nil {
		return dst, nil
	}
	if !o.BuildRootfs {
		return "", errdefs.New(errdefs.ErrMissingDependency, "the default root filesystem is not built yet: run `make setup` (or `kiln assets build`)")
	}
	return dst, BuildRootfs(ctx, dst, o.Mirror, o.Log)
}

// BuildRootfs debootstraps a minimal Debian into a temporary directory under dst's
// directory and packs it into an ext4 image at dst.
func BuildRootfs(ctx context.Context, dst, mirror string, log io.Writer) error {
	return buildRootfs(ctx, dst, recipe{what: "the default root filesystem"}, mirror, log)
}

// recipe is what goes into a root filesystem beyond debootstrap's minimal base.
type recipe struct {
	what    string
	include []string          // Debian packages
	files   map[string]string // path in the tree → host file, copied executable
}

func buildRootfs(ctx context.Context, dst string, r recipe, mirror string, log io.Writer) error {
	deb, err := exec.LookPath("debootstrap")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/debootstrap"); serr != nil {
			return errdefs.Missing("debootstrap", "debootstrap")
		}
		deb = "/usr/sbin/debootstrap"
	}
	if mirror == "" {
		mirror = "http://deb.debian.org/debian"
	}
	tree, err := os.MkdirTemp(filepath.Dir(dst), "rootfs-build-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tree)
	fmt.Fprintf(log, "building %s (debootstrap %s %s); this takes a minute or two\n", r.what, RootfsVariant, RootfsSuite)
	start := time.Now()
	args := []string{"--variant=" + RootfsVariant}
	if len(r.include) > 0 {
		args = append(args, "--include="+strings.Join(r.include, ","))
	}
	cmd := exec.CommandContext(ctx, deb, append(args, RootfsSuite, tree, mirror)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		tail := string(out)
		if len(tail) > 2000 {
			tail = tail[len(tail)-2000:]
		}
		return fmt.Errorf("debootstrap failed: %w\n%s", err, strings.TrimSpace(tail))
	}
	// Trim what a VM never needs: package caches and docs.
	for _, p := range []string{"var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"} {
		ents, _ := os.ReadDir(filepath.Join(tree, p))
		for _, e := range ents {
			if e.Name() != "partial" && e.Name() != "lock" {
				os.RemoveAll(filepath.Join(tree, p, e.Name()))
			}
		}
	}
	os.WriteFile(filepath.Join(tree, "etc/hostname"), []byte("kiln\n"), 0o644)
	for dst, src := range r.files {
		if err := copyFile(src, filepath.Join(tree, dst), 0o755); err != nil {
			return err
		}
	}
	size, err := dirSize(tree)
	if err != nil {
		return err
	}
	// Room for the filesystem's own metadata; the VM never writes here.
	size = size*13/10 + 64<<20
	// Named after the tree, which is this build's own: two builds never share it.
	tmp := tree + ".ext4"
	defer os.Remove(tmp)
	if err := volume.Create(ctx, tmp, size, tree); err != nil {
		return err
	}
	if err := atomicfile.Rename(tmp, dst); err != nil {
		return err
	}
	fmt.Fprintf(log, "%s ready in %s: %s\n", r.what, time.Since(start).Round(time.Second), dst)
	return nil
}

func dirSize(dir string) (int64, error) {
	var n int64
	err := filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		n += fi.Size() + 4096
		return nil
	})
	return n, err
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// BuilderPackages are the Debian packages a builder VM needs beside buildkitd: runc runs
// each build step, ca-certificates lets steps fetch over TLS where the network allows.
var BuilderPackages = []string{"runc", "ca-certificates"}

// BuilderRootfsPath is where the builder root filesystem for a buildkitd binary is cached.
func BuilderRootfsPath(dir, buildkitd string) (string, error) {
	sum, err := hashFile(buildkitd)
	if err != nil {
		return "", errdefs.New(errdefs.ErrMissingDependency, "buildkitd not found at %s: run `make setup` (it builds bin/buildkitd)", buildkitd)
	}
	key := hashStrings(append([]string{RootfsSuite, RootfsVariant, rootfsRecipe, "builder", sum}, BuilderPackages...)...)
	return filepath.Join(dir, "builder-rootfs-"+key+".ext4"), nil
}

// EnsureBuilder returns the builder root filesystem: the minimal Debian plus runc and
// the given buildkitd, built on first use when o.BuildRootfs allows it.
func EnsureBuilder(ctx context.Context, o Options, buildkitd string) (string, error) {
	if o.Log == nil {
		o.Log = io.Discard
	}
	dst, err := BuilderRootfsPath(o.Dir, buildkitd)
	if err != nil {
		return "", err
	}
	if _, err := volume.Inspect(dst); err == nil {
		return dst, nil
	}
	if !o.BuildRootfs {
		return "", errdefs.New(errdefs.ErrMissingDependency, "the builder root filesystem is not built yet: run `make setup` (or `kiln assets build`)")
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return "", err
	}
	return dst, buildRootfs(ctx, dst, recipe{what: "the builder root filesystem", include: BuilderPackages,
		files: map[string]string{"usr/local/bin/buildkitd": buildkitd}}, o.Mirror, o.Log)
}
