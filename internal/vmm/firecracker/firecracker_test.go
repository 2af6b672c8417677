package firecracker_test

import (
	"os"
	"testing"

	"github.com/kilnhq/kiln/internal/testutil"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/firecracker"
	"github.com/kilnhq/kiln/internal/vmm/vmmtest"
	"github.com/kilnhq/kiln/internal/vmrun"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testutil.Cleanup()
	os.Exit(code)
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
