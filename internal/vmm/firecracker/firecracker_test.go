package firecracker_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/testutil"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/firecracker"
	"github.com/kilnhq/kiln/internal/vmm/vmmtest"
	"github.com/kilnhq/kiln/internal/vmrun"
)

func TestMain(m *testing.M) {
	os.Exit(testutil.Finish(m.Run()))
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
