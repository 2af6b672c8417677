package vmrun_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/cgroup"
	"github.com/kilnhq/kiln/internal/testutil"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/qemu"
	"github.com/kilnhq/kiln/internal/vmrun"
)

func TestMain(m *testing.M) {
	os.Exit(testutil.Finish(m.Run()))
}

// TestReapConfined: a VM whose kiln died is reaped with its confinement: the VMM killed,
// its cgroup removed and its user released, both when kiln died with the VMM's handle
// recorded and when it died before (the VMM is then found by its command line and its
// cgroup).
func TestReapConfined(t *testing.T) {
	testutil.RequireQEMU(t)
	if os.Geteuid() != 0 {
		t.Skip("confining a VMM needs root")
	}
	cg, err := cgroup.Host()
	if err != nil {
		t.Fatal(err)
	}
	// A dead owner: a process that has exited.
	dead := exec.Command("true")
	dead.Run()
	for _, handle := range []bool{true, false} {
		rt := testutil.Runtime(t, &qemu.Driver{})
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		inst, err := rt.Boot(ctx, vmrun.Spec{CPUs: 1, MemoryMiB: 256})
		if err != nil {
			t.Fatal(err)
		}
		pid, name := inst.VM.Handle().PID, cgroup.Name(inst.ID)
		// kiln dies: its connections go, the VM stays, and its record names a dead owner
		// (and, if kiln died early, no handle).
		inst.Agent.Close()
		inst.VM.Detach()
		path := filepath.Join(inst.Dir, "record.json")
		var rec map[string]any
		b, _ := os.ReadFile(path)
		json.Unmarshal(b, &rec)
		rec["owner_pid"], rec["owner_start"] = dead.Process.Pid, 1
		if !handle {
			delete(rec, "handle")
		}
		b, _ = json.Marshal(rec)
		os.WriteFile(path, b, 0o600)

		var log bytes.Buffer
		n, err := vmrun.Reap(ctx, rt.DataDir, map[string]vmm.Driver{"qemu": &qemu.Driver{}}, &log)
		if err != nil || n != 1 || !strings.Contains(log.String(), inst.ID) {
			t.Fatalf("handle %v: reaped %d (%v): %s", handle, n, err, log.String())
		}
		if vmm.Alive(pid, 0) {
			t.Errorf("handle %v: the VMM %d survived the reaper", handle, pid)
		}
		if _, err := cg.Limits(name); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("handle %v: cgroup %s survived the reaper: %v", handle, name, err)
		}
		if uids, err := vmrun.Claims(rt.DataDir); err != nil || len(uids) != 0 {
			t.Errorf("handle %v: VMM users %v (%v) still claimed after the reaper", handle, uids, err)
		}
	}
}
