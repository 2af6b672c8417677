package vmrun

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"github.com/kilnhq/kiln/internal/cgroup"
	"github.com/kilnhq/kiln/internal/vmm"
)

// useClaimDir points the host-wide claims at a directory of the test's own.
func useClaimDir(t *testing.T) {
	t.Helper()
	old := ClaimDir
	ClaimDir = t.TempDir()
	t.Cleanup(func() { ClaimDir = old })
}

// newVMDir makes the directory of VM id in rt's data dir, as Boot does before claiming.
func newVMDir(t *testing.T, rt *Runtime, id string) string {
	t.Helper()
	dir := filepath.Join(rt.vmsDir(), id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// testUIDs is a range no VMM of another test (or kiln) on this host runs as: the sweep
// judges a claim by the processes of its user.
var testUIDs = UIDRange{First: DefaultUIDs.First + DefaultUIDs.Count + uint32(os.Getpid()%4096)*16, Count: 16}

// Two data dirs on one host, with the same uid range and even the same VM id,
// never hand one user to two VMMs; one data dir cannot release the other's claim; a
// stale claim (its VM directory gone) is reclaimed only once no process runs as its user.
func TestClaimsAreHostWide(t *testing.T) {
	useClaimDir(t)
	a, b := &Runtime{DataDir: t.TempDir(), UIDs: testUIDs}, &Runtime{DataDir: t.TempDir(), UIDs: testUIDs}
	dirA, dirB := newVMDir(t, a, "vm1"), newVMDir(t, b, "vm1")
	ca, err := a.claimUser("vm1")
	if err != nil {
		t.Fatal(err)
	}
	cb, err := b.claimUser("vm1")
	if err != nil {
		t.Fatal(err)
	}
	if ca.UID == cb.UID {
		t.Fatalf("two data dirs' VMs both run as user %d", ca.UID)
	}
	releaseUser(b.DataDir, ca.UID, "vm1")
	if got, _ := Claims(a.DataDir); !slices.Equal(got, []uint32{ca.UID}) {
		t.Errorf("after the other data dir released it, %s claims %v, want [%d]", a.DataDir, got, ca.UID)
	}

	// a's VM is gone without releasing its user (kiln killed): any data dir's sweep
	// frees the user, and leaves b's, whose VM is there.
	os.RemoveAll(dirA)
	var log bytes.Buffer
	sweepUsers(b.DataDir, &log)
	if got, _ := Claims(a.DataDir); len(got) != 0 {
		t.Errorf("a claim whose VM is gone survived the sweep: %v", got)
	}
	if got, _ := Claims(b.DataDir); !slices.Equal(got, []uint32{cb.UID}) {
		t.Errorf("the sweep took a live VM's user: %s claims %v, want [%d]", b.DataDir, got, cb.UID)
	}

	if os.Geteuid() != 0 {
		return // only root can run a process as the VMM's user
	}
	// b's VM directory goes while a process still runs as its user (a VMM left in a
	// cgroup that could not be removed): the claim stays until that process is gone.
	vmmLeft := exec.Command("sleep", "600")
	vmmLeft.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: cb.UID, Gid: cb.UID, Groups: []uint32{}}}
	if err := vmmLeft.Start(); err != nil {
		t.Fatal(err)
	}
	defer vmmLeft.Process.Kill()
	os.RemoveAll(dirB)
	sweepUsers(b.DataDir, &log)
	if got, _ := Claims(b.DataDir); !slices.Equal(got, []uint32{cb.UID}) {
		t.Errorf("the sweep freed user %d while a process runs as it: claims %v", cb.UID, got)
	}
	vmmLeft.Process.Kill()
	vmmLeft.Wait()
	sweepUsers(b.DataDir, &log)
	if got, _ := Claims(b.DataDir); len(got) != 0 {
		t.Errorf("user %d stayed claimed after its last process ended: %v", cb.UID, got)
	}
}

// Destroy keeps the VM's user claimed when its cgroup cannot be removed (the VMM may
// still be in it, running as that user), and releases it once the cgroup goes.
func TestDestroyKeepsClaimWhileCgroupStays(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("making cgroups needs root")
	}
	cg, err := cgroup.Host()
	if err != nil {
		t.Fatal(err)
	}
	useClaimDir(t)
	rt := &Runtime{DataDir: t.TempDir(), UIDs: testUIDs}
	id := "claimtest" + filepath.Base(rt.DataDir)
	dir := newVMDir(t, rt, id)
	conf, err := rt.claimUser(id)
	if err != nil {
		t.Fatal(err)
	}
	conf.Cgroup = cgroup.Name(id)
	// A group inside the VM's keeps the kernel from removing it.
	busy := conf.Cgroup + "/busy"
	if err := cg.Create(busy, cgroup.Limits{CPUs: 1, MemoryBytes: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cg.Remove(busy); cg.Remove(conf.Cgroup) })
	inst := &Instance{ID: id, Dir: dir, rt: rt, Config: vmm.Config{ID: id, Dir: dir, Confine: conf}}
	ctx := context.Background()
	if err := inst.Destroy(ctx); err == nil {
		t.Fatal("Destroy reported no error though the VM's cgroup is still there")
	}
	if got, _ := Claims(rt.DataDir); !slices.Equal(got, []uint32{conf.UID}) {
		t.Fatalf("with the VM's cgroup still there, its user %d was released: claims %v", conf.UID, got)
	}
	if err := cg.Remove(busy); err != nil {
		t.Fatal(err)
	}
	if err := inst.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
	if got, _ := Claims(rt.DataDir); len(got) != 0 {
		t.Errorf("user %d still claimed after the VM's cgroup went: %v", conf.UID, got)
	}
}
