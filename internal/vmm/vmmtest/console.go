package vmmtest

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// FloodConsole has the guest write to its console without end and checks that the log on
// the host stays within limit (the two rotating files of vmm.CaptureConsole) while it
// rotates at least three times, and that it keeps the newest output.
func FloodConsole(t *testing.T, inst *vmrun.Instance, limit int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	log := inst.VM.ConsoleLog()
	// Write until the log has rotated three times, or give up after two minutes.
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
				if fi.Size() > limit/2 {
					t.Fatalf("%s holds %d bytes, above half the cap %d", f, fi.Size(), limit)
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
	if n := written(); n > limit {
		t.Errorf("console logs hold %d bytes, cap %d", n, limit)
	}
	if tail := string(vmm.ConsoleTail(log, 200)); !strings.Contains(tail, "kiln-console-flood") {
		t.Errorf("the log's tail lacks the newest output: %q", tail)
	}
}
