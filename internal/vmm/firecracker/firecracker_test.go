package firecracker_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/testutil"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/firecracker"
	"github.com/kilnhq/kiln/internal/vmm/vmmtest"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// consoleCap is the console log cap of the test's console logger.
const consoleCap = 256 << 10

func TestMain(m *testing.M) {
	// Run again as the driver's console logger, this binary stands in for
	// `kiln console-log` (which does the same with the default cap).
	if len(os.Args) == 3 && os.Args[1] == "console-log" {
		vmm.ConsoleLogCap = consoleCap
		if err := vmm.CaptureConsole(os.Stdin, os.Args[2]); err != nil {
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(testutil.Finish(m.Run()))
}

// A guest that writes to its console without end leaves a log within the cap: the
// console goes through a pipe to the console logger, which outlives kiln as Firecracker
// does (Firecracker writes it to a plain file otherwise, without a bound).
func TestConsoleLogCapped(t *testing.T) {
	testutil.RequireQEMU(t)
	bin := testutil.GoBuild(t, "./internal/vmm/firecracker/fctest/fake-firecracker", testutil.TempDir(t))
	rt := testutil.Runtime(t, &firecracker.Driver{Binary: bin, ConsoleLogger: []string{os.Args[0], "console-log"}})
	rt.Accel = vmm.AccelKVM
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	inst, err := rt.Boot(ctx, vmrun.Spec{CPUs: 1, MemoryMiB: 256})
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	defer inst.Destroy(context.Background())
	vmmtest.FloodConsole(t, inst, consoleCap)
}

// TestConformance runs the driver through the whole suite against fake-firecracker: the
// API test server with real guests behind it. Where a real firecracker binary and usable
// KVM exist, KILN_TEST_FIRECRACKER=/path/to/firecracker runs the suite against it too.
func TestConformance(t *testing.T) {
	testutil.RequireQEMU(t)
	bin := testutil.GoBuild(t, "./internal/vmm/firecracker/fctest/fake-firecracker", testutil.TempDir(t))
	accel := vmm.AccelKVM // the fake ignores it; the driver refuses TCG as real Firecracker needs KVM
	if real := os.Getenv("KILN_TEST_FIRECRACKER"); real != "" {
		bin = real
	}
	vmmtest.Run(t, func(t *testing.T) *vmrun.Runtime {
		rt := testutil.Runtime(t, &firecracker.Driver{Binary: bin})
		rt.Accel = accel
		return rt
	}, vmmtest.Options{})
}

// TestConformanceJailed runs the suite with Firecracker under its jailer, fake-firecracker
// standing in for both: every path the driver gives the API must be in the jail and open
// to the VM's user, and the QEMU behind the API runs as that user. Nothing of the jails
// is left after.
func TestConformanceJailed(t *testing.T) {
	testutil.RequireQEMU(t)
	if os.Geteuid() != 0 {
		t.Skip("the jailer needs root")
	}
	bin := testutil.GoBuild(t, "./internal/vmm/firecracker/fctest/fake-firecracker", testutil.TempDir(t))
	jailer := bin
	if real := os.Getenv("KILN_TEST_FIRECRACKER"); real != "" {
		bin, jailer = real, os.Getenv("KILN_TEST_JAILER")
		if jailer == "" {
			t.Fatal("KILN_TEST_FIRECRACKER is set without KILN_TEST_JAILER")
		}
	}
	vmmtest.Run(t, func(t *testing.T) *vmrun.Runtime {
		d := &firecracker.Driver{Binary: bin}
		rt := testutil.Runtime(t, d)
		base := filepath.Join(rt.DataDir, "jail")
		d.Jailer = &firecracker.Jailer{Binary: jailer, ChrootBase: base}
		rt.Accel = vmm.AccelKVM
		t.Cleanup(func() {
			if ents, _ := os.ReadDir(filepath.Join(base, filepath.Base(bin))); len(ents) > 0 {
				t.Errorf("%d jails left behind in %s", len(ents), base)
			}
		})
		return rt
	}, vmmtest.Options{Boots: 2})
}

// A NIC is configured through the API, and a restore from a directory without a
// snapshot fails cleanly. (SuspendResume in the conformance suite covers a snapshot that
// works; fctest's tests cover the API's snapshot rules.)
func TestSnapshotRequests(t *testing.T) {
	testutil.RequireQEMU(t)
	bin := testutil.GoBuild(t, "./internal/vmm/firecracker/fctest/fake-firecracker", testutil.TempDir(t))
	rt := testutil.Runtime(t, &firecracker.Driver{Binary: bin})
	rt.Accel = vmm.AccelKVM
	ctx := context.Background()
	// The NIC is configured through the API (the test server checks the request) though
	// the QEMU behind it gives the guest no network.
	inst, err := rt.Boot(ctx, vmrun.Spec{CPUs: 1, MemoryMiB: 256, NICs: []vmm.NIC{{HostDev: "kilntap0", MAC: "06:00:ac:10:00:02"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Destroy(ctx)
	if _, err := (&firecracker.Driver{Binary: bin}).Restore(ctx, vmm.Config{ID: "r", Dir: testutil.TempDir(t)}, testutil.TempDir(t)); err == nil {
		t.Error("restored from a directory with no snapshot")
	}
}

func TestRefusesSoftwareEmulation(t *testing.T) {
	d := &firecracker.Driver{Binary: "/bin/true"}
	_, err := d.Create(context.Background(), vmm.Config{ID: "x", Dir: t.TempDir(), CPUs: 1, MemoryMiB: 256, Kernel: "/bin/true", Accel: vmm.AccelTCG})
	if err == nil || !strings.Contains(err.Error(), "--vmm qemu") {
		t.Errorf("err = %v", err)
	}
}

func TestMissingBinary(t *testing.T) {
	d := &firecracker.Driver{Binary: "kiln-no-firecracker-here"}
	_, err := d.Create(context.Background(), vmm.Config{ID: "x", Dir: t.TempDir(), CPUs: 1, MemoryMiB: 256, Kernel: "/bin/true", Accel: vmm.AccelKVM})
	if !errors.Is(err, errdefs.ErrMissingDependency) {
		t.Errorf("err = %v", err)
	}
}

// A machine that suspends, resumes and suspends again writes a Full snapshot, then a Diff
// merged onto the memory it was restored from; it resumes from that the same VM.
func TestDiffSnapshotAfterResume(t *testing.T) {
	testutil.RequireQEMU(t)
	bin := testutil.GoBuild(t, "./internal/vmm/firecracker/fctest/fake-firecracker", testutil.TempDir(t))
	rt := testutil.Runtime(t, &firecracker.Driver{Binary: bin})
	rt.Accel = vmm.AccelKVM
	ctx := context.Background()
	inst, err := rt.Boot(ctx, vmrun.Spec{CPUs: 1, MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Destroy(ctx)
	st, err := inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"sh", "-c", "echo kept > /tmp/mark"}}, guest.IO{})
	if err != nil || st.Code != 0 {
		t.Fatalf("exec: %+v %v", st, err)
	}
	logOf := func() string {
		b, _ := os.ReadFile(filepath.Join(inst.Dir, "vmm.log"))
		return string(b)
	}
	if err := inst.Suspend(ctx); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logOf(), "snapshot created: Full") {
		t.Fatalf("first snapshot was not Full:\n%s", logOf())
	}
	if err := inst.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(inst.Dir, "memory.base")); err != nil {
		t.Fatalf("the restored memory file was not kept as the base of the next Diff: %v", err)
	}
	if err := inst.Suspend(ctx); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logOf(), "snapshot created: Diff") {
		t.Fatalf("second snapshot was not a Diff:\n%s", logOf())
	}
	if _, err := os.Stat(filepath.Join(inst.SnapshotDir(), "memory.diff")); !os.IsNotExist(err) {
		t.Error("the Diff file was left after merging")
	}
	if err := inst.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	st, err = inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"cat", "/tmp/mark"}}, guest.IO{Stdout: &out})
	if err != nil || st.Code != 0 || out.String() != "kept\n" {
		t.Fatalf("after the Diff resume: %q %+v %v", out.String(), st, err)
	}
}

// MergeDiff copies a sparse Diff's data over the base at the same offsets and leaves the
// rest of the base alone.
func TestMergeDiff(t *testing.T) {
	dir := t.TempDir()
	base, diff := filepath.Join(dir, "base"), filepath.Join(dir, "diff")
	const size = 8 << 20
	want := make([]byte, size)
	for i := range want {
		want[i] = 'b'
	}
	if err := os.WriteFile(base, want, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(diff)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	for _, off := range []int64{0, 3<<20 + 4096, size - 4096} {
		page := []byte(strings.Repeat("d", 4096))
		f.WriteAt(page, off)
		copy(want[off:], page)
	}
	f.Close()
	if err := firecracker.MergeDiff(base, diff); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(base)
	if !bytes.Equal(got, want) {
		t.Fatal("merged memory differs from the expected pages")
	}
}
