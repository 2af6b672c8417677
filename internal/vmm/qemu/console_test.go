package qemu_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/testutil"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/qemu"
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
	log := inst.VM.ConsoleLog()
	// Write until the log has rotated twice over, or give up after two minutes.
	req := guest.ExecRequest{Argv: []string{"sh", "-c", "yes kiln-console-flood > /dev/console"}, TimeoutMS: 120_000}
	p, err := inst.Agent.Start(ctx, req, guest.IO{})
	if err != nil {
		t.Fatal(err)
	}
	written := func() int64 {
		var n int64
		for _, f := range []string{log, log + ".1"} {
			if fi, err := os.Stat(f); err == nil {
				n += fi.Size()
				if fi.Size() > vmm.ConsoleLogCap/2 {
					t.Fatalf("%s holds %d bytes, above half the cap %d", f, fi.Size(), vmm.ConsoleLogCap)
				}
			}
		}
		return n
	}
	rotations := 0
	var lastSize int64
	for deadline := time.Now().Add(2 * time.Minute); rotations < 3 && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		written()
		fi, err := os.Stat(log)
		if err == nil && fi.Size() < lastSize {
			rotations++
		}
		if err == nil {
			lastSize = fi.Size()
		}
	}
	p.Signal(9)
	p.Wait(ctx)
	if rotations < 3 {
		t.Fatalf("the console log rotated %d times in two minutes: the flood did not reach it", rotations)
	}
	if n := written(); n > vmm.ConsoleLogCap {
		t.Errorf("console logs hold %d bytes, cap %d", n, vmm.ConsoleLogCap)
	}
	if tail := string(vmm.ConsoleTail(log, 200)); !strings.Contains(tail, "kiln-console-flood\r\n") {
		t.Errorf("the log's tail lacks the newest output: %q", tail)
	}
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
