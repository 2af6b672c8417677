// Package testutil gives kiln's tests real guest assets and runtimes. Tests that need a
// VM call Runtime; it skips only where the machine truly lacks QEMU or the guest kernel
// (CI runs `make setup` first, so there nothing skips), and fails loudly otherwise.
package testutil

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/assets"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/qemu"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// DataDir is the shared asset cache: KILN_DATA_DIR or /var/lib/kiln, as `make setup`
// fills it.
func DataDir() string {
	if d := os.Getenv("KILN_DATA_DIR"); d != "" {
		return d
	}
	return "/var/lib/kiln"
}

var buildMu sync.Mutex

// GoBuild builds a main package of this module into dir and returns the binary's path.
func GoBuild(t testing.TB, pkg, dir string) string {
	t.Helper()
	out, err := build(pkg, dir)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func build(pkg, dir string) (string, error) {
	buildMu.Lock()
	defer buildMu.Unlock()
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = Root()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
	}
	return out, nil
}

// Root is kiln's checkout: the directory of its go.mod, found from this file's place in
// it, so a test module of its own under the repository (compat/flaps) builds kiln's
// binaries too.
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// RequireQEMU skips the test where QEMU or the guest kernel is absent.
func RequireQEMU(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs a real VM; skipped in -short mode")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("qemu-system-x86_64 not installed: run `make setup`")
	}
	if _, _, err := assets.DebianKernel("/boot"); err != nil {
		t.Skip("no guest kernel in /boot: run `make setup`")
	}
}

var (
	assetsOnce sync.Once
	assetSet   assets.Set
	assetErr   error
	binDir     string
)

// Assets returns the guest assets, building kiln-init from this checkout and the root
// filesystem if `make setup` has not.
// TestKernel is the guest kernel tests boot: KILN_TEST_KERNEL (kiln, debian or a path),
// else kiln's own, which `make setup` builds; tests fail, naming `make setup`, without it.
func TestKernel() string {
	if k := os.Getenv("KILN_TEST_KERNEL"); k != "" {
		return k
	}
	return assets.KernelKiln
}

// initBin is the kiln-init that Assets built.
var initBin string

// DebianAssets are the guest assets with the host's Debian kernel and its modules: the
// fallback (--kernel debian) that tests keep booting.
func DebianAssets(t testing.TB) assets.Set {
	t.Helper()
	Assets(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	set, err := assets.Ensure(ctx, assets.Options{Dir: filepath.Join(DataDir(), "assets"), Init: initBin, Log: os.Stderr, Kernel: assets.KernelDebian})
	if err != nil {
		t.Fatalf("guest assets with Debian's kernel: %v", err)
	}
	return set
}

func Assets(t testing.TB) assets.Set {
	t.Helper()
	RequireQEMU(t)
	assetsOnce.Do(func() {
		var err error
		binDir, err = os.MkdirTemp("", "kiln-testbin-")
		if err != nil {
			assetErr = err
			return
		}
		init, err := build("./cmd/kiln-init", binDir)
		if err != nil {
			assetErr = err
			return
		}
		initBin = init
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		assetSet, assetErr = assets.Ensure(ctx, assets.Options{
			Dir: filepath.Join(DataDir(), "assets"), Init: init, Log: os.Stderr, BuildRootfs: true,
			Kernel: TestKernel(),
		})
	})
	if assetErr != nil {
		t.Fatalf("guest assets: %v", assetErr)
	}
	return assetSet
}

// Finish removes the shared test binaries and then checks that the package's tests left
// nothing of kiln behind: no VMM or other process started from a test directory, no test
// directory in the temporary directory. Call it from TestMain with m.Run's code; it
// returns the code to exit with.
func Finish(code int) int {
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	var left []string
	left = append(left, ProcessesNaming(filepath.Join(os.TempDir(), tempPrefix()))...)
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), tempPrefix()+"*"))
	left = append(left, dirs...)
	if len(left) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: the tests left these behind:\n  %s\n", strings.Join(left, "\n  "))
		if code == 0 {
			code = 1
		}
	}
	return code
}

// Runtime returns a runtime for driver whose VM state lives in a fresh temporary
// directory. At the end of the test it checks that nothing of the test's VMs is left:
// no VM directory, no disk lock, no VMM process naming the directory.
func Runtime(t testing.TB, driver vmm.Driver) *vmrun.Runtime {
	t.Helper()
	set := Assets(t)
	dir := TempDir(t)
	rt := &vmrun.Runtime{DataDir: dir, Driver: driver, Assets: set}
	// Whether KVM works is a property of the host; probe it with QEMU, which runs here.
	accel, _, err := (&vmrun.Runtime{DataDir: DataDir(), Driver: &qemu.Driver{}, Assets: set}).ResolveAccel(context.Background(), os.Stderr)
	if err != nil {
		t.Fatalf("resolving accelerator: %v", err)
	}
	rt.Accel = accel
	t.Cleanup(func() { RequireNothingLeft(t, dir) })
	return rt
}

// TempDir is a short temporary directory: Unix socket paths inside it must stay under
// the 108-byte limit, which t.TempDir's long names can break.
func TempDir(t testing.TB) string {
	d, err := os.MkdirTemp("", tempPrefix())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// tempPrefix names this test process's temporary directories, so that packages tested in
// parallel check only their own leftovers.
func tempPrefix() string { return fmt.Sprintf("kiln-t%d-", os.Getpid()) }

// RequireNothingLeft fails the test if anything of the VMs under dataDir remains.
func RequireNothingLeft(t testing.TB, dataDir string) {
	t.Helper()
	if ents, _ := os.ReadDir(filepath.Join(dataDir, "vms")); len(ents) > 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("VM directories left behind in %s/vms: %v", dataDir, names)
	}
	if ents, _ := os.ReadDir(filepath.Join(dataDir, "locks")); len(ents) > 0 {
		t.Errorf("%d disk locks left behind in %s/locks", len(ents), dataDir)
	}
	if pids := ProcessesNaming(dataDir); len(pids) > 0 {
		t.Errorf("processes still running for %s: %v", dataDir, pids)
	}
}

// ProcessesNaming lists processes whose command line contains s.
func ProcessesNaming(s string) []string {
	var out []string
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if p.Name()[0] < '0' || p.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(b), s) {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", p.Name(), "stat")); err == nil {
			if i := strings.LastIndexByte(string(st), ')'); i > 0 && len(st) > i+2 && st[i+2] == 'Z' {
				continue
			}
		}
		out = append(out, p.Name()+" "+strings.ReplaceAll(string(b), "\x00", " "))
	}
	return out
}

// KillProcessesNaming kills every process whose command line contains s, for tests that
// must clean up after a failure.
func KillProcessesNaming(s string) {
	for _, p := range ProcessesNaming(s) {
		var pid int
		fmt.Sscan(p, &pid)
		if pid > 0 && pid != os.Getpid() {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	for i := 0; i < 100 && len(ProcessesNaming(s)) > 0; i++ {
		time.Sleep(50 * time.Millisecond)
	}
}

// BuilderRootfs returns the builder root filesystem for this checkout's bin/buildkitd
// (KILN_BUILDKITD overrides), building it if `make setup` has not. A missing buildkitd
// fails the test with the command that builds it.
func BuilderRootfs(t testing.TB) string {
	t.Helper()
	Assets(t)
	bk := os.Getenv("KILN_BUILDKITD")
	if bk == "" {
		bk = filepath.Join(Root(), "bin", "buildkitd")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	p, err := assets.EnsureBuilder(ctx, assets.Options{Dir: filepath.Join(DataDir(), "assets"), Log: os.Stderr, BuildRootfs: true}, bk)
	if err != nil {
		t.Fatalf("builder root filesystem: %v (run `make build` for bin/buildkitd)", err)
	}
	return p
}

// Listen listens on network and addr and accepts every connection only to close it:
// something to connect to, for tests of who may connect. It is closed when the test ends.
func Listen(t testing.TB, network, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln
}
