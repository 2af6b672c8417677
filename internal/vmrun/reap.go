package vmrun

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kilnhq/kiln/internal/vmm"
)

// Reap removes VMs whose owning kiln process is gone (killed with SIGKILL, or the host
// lost power mid-run): it kills their VMM processes, releases their disks and deletes
// their directories, and says so on log. drivers maps a driver name to the driver that
// can recover its handles.
func Reap(ctx context.Context, dataDir string, drivers map[string]vmm.Driver, log io.Writer) (int, error) {
	ents, err := os.ReadDir(filepath.Join(dataDir, "vms"))
	if os.IsNotExist(err) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer sweepUsers(dataDir, log)
	n := 0
	for _, e := range ents {
		dir := filepath.Join(dataDir, "vms", e.Name())
		rec, _ := readRecord(dir)
		if rec.Owner != "" {
			continue // a machine's VM: the machine service adopts or removes it
		}
		if rec.OwnerPID != 0 && vmm.Alive(rec.OwnerPID, rec.OwnerStart) {
			continue
		}
		if rec.OwnerPID == 0 {
			// A directory without a readable record is either being set up right now or
			// was left by a crash before the record was written; only the latter is old.
			if fi, err := os.Stat(dir); err == nil && time.Since(fi.ModTime()) < time.Minute {
				continue
			}
		}
		what := "files"
		if d := drivers[rec.Handle.Driver]; d != nil && rec.Handle.PID != 0 {
			if vm, err := d.Recover(ctx, rec.Handle); err == nil || vm != nil {
				if vmm.Alive(rec.Handle.PID, rec.Handle.PIDStart) {
					what = fmt.Sprintf("%s process %d", rec.Handle.Driver, rec.Handle.PID)
				}
				vm.Destroy(ctx)
			}
		}
		if pids := killByDir(dir); len(pids) > 0 {
			what = fmt.Sprintf("VMM process %v", pids)
		}
		cgErr := removeCgroup(rec.Config.Confine.Cgroup)
		if cgErr != nil {
			fmt.Fprintf(log, "kiln: reaping VM %s: %v\n", e.Name(), cgErr)
		}
		if cgErr == nil && rec.Handle.PID == 0 {
			// No handle, so no driver tore it down above: what a driver keeps outside the
			// directory (a jail, with files and devices lent to the VM's user) goes now.
			for name, d := range drivers {
				if r, ok := d.(vmm.Releaser); ok {
					if err := r.Release(e.Name()); err != nil {
						fmt.Fprintf(log, "kiln: reaping VM %s: %s: %v\n", e.Name(), name, err)
					}
				}
			}
		}
		if err := os.RemoveAll(dir); err != nil {
			return n, err
		}
		if cgErr == nil { // else its VMM may live on as its user: see sweepUsers
			releaseUser(dataDir, rec.Config.Confine.UID, rec.ID)
		}
		n++
		fmt.Fprintf(log, "kiln: reaped VM %s left behind by a kiln process that was killed (%s removed)\n", e.Name(), what)
	}
	return n, nil
}

// killByDir kills any process whose command line names dir: a VMM started for this VM
// whose handle was never recorded because kiln died in between.
func killByDir(dir string) []int {
	var killed []int
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(b), dir+"/") {
			continue
		}
		if vmm.KillAndWait(pid, vmm.ProcStart(pid), 5*time.Second) == nil {
			killed = append(killed, pid)
		}
	}
	return killed
}
