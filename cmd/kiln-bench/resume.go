package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// benchResume compares a cold start with a resume of the same VM, to the first answer of
// a command, and measures the snapshot.
func benchResume(ctx context.Context, rt *vmrun.Runtime, add func(string, float64, string, string)) error {
	first := func(inst *vmrun.Instance) error {
		st, err := inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"true"}}, guest.IO{})
		if err == nil && st.Code != 0 {
			err = fmt.Errorf("true exited %d", st.Code)
		}
		return err
	}
	spec := vmrun.Spec{CPUs: 1, MemoryMiB: 512}
	start := time.Now()
	inst, err := rt.Boot(ctx, spec)
	if err != nil {
		return err
	}
	defer inst.Destroy(context.WithoutCancel(ctx))
	if err := first(inst); err != nil {
		return err
	}
	cold := time.Since(start)
	// Touch memory the way a warmed-up service would.
	inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"sh", "-c", "head -c 134217728 /dev/urandom > /dev/shm/warm"}}, guest.IO{})
	start = time.Now()
	if err := inst.Suspend(ctx); err != nil {
		return err
	}
	save := time.Since(start)
	var size int64
	filepath.Walk(inst.SnapshotDir(), func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			size += fi.Size()
		}
		return nil
	})
	start = time.Now()
	if err := inst.Resume(ctx); err != nil {
		return err
	}
	if err := first(inst); err != nil {
		return err
	}
	resume := time.Since(start)
	add("cold_start_to_first_answer", ms(cold), "ms", "boot + exec of true")
	add("resume_to_first_answer", ms(resume), "ms", fmt.Sprintf("%.2fx of the cold start", float64(resume)/float64(cold)))
	gib := float64(spec.MemoryMiB) / 1024
	add("snapshot_size", float64(size)/(1<<20), "MiB", fmt.Sprintf("%d MiB guest holding 128 MiB of random data", spec.MemoryMiB))
	add("snapshot_write_per_gib_ram", save.Seconds()*1000/gib, "ms", "pause + save, per GiB of guest RAM")
	return nil
}
