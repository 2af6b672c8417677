package qemu_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/testutil"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/qemu"
	"github.com/kilnhq/kiln/internal/vmm/vmmtest"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// A guest that writes to its console without end leaves a log on the host within the
// cap, holding the newest output.
func TestConsoleLogCapped(t *testing.T) {
	testutil.RequireQEMU(t)
	old := vmm.ConsoleLogCap
	vmm.ConsoleLogCap = 256 << 10
	defer func() { vmm.ConsoleLogCap = old }()
	rt := testutil.Runtime(t, &qemu.Driver{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	inst, err := rt.Boot(ctx, vmrun.Spec{CPUs: 1, MemoryMiB: 256})
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	defer inst.Destroy(context.Background())
	vmmtest.FloodConsole(t, inst, vmm.ConsoleLogCap)
}

// A boot that fails says why with the end of the console, and only the end.
func TestConsoleTailOnBootFailure(t *testing.T) {
	testutil.RequireQEMU(t)
	rt := testutil.Runtime(t, &qemu.Driver{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// A kernel that finds no init panics; the error carries the end of a verbose boot.
	_, err := rt.Boot(ctx, vmrun.Spec{CPUs: 1, MemoryMiB: 256, Cmdline: "loglevel=7 rdinit=/kiln-no-such-init"})
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("boot with no init: %v", err)
	}
	_, tail, ok := strings.Cut(err.Error(), "--- guest console ---\n")
	if !ok || len(tail) > 3000 || !strings.Contains(tail, "Kernel panic") {
		t.Errorf("boot failure error (%d bytes of console) lacks the panic or is not a tail:\n%s", len(tail), err)
	}
}
