package vmrun

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kilnhq/kiln/internal/cgroup"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/vmm"
)

// Each VMM runs as a host user of its own, taken from a range, rather than as one shared
// "kiln-vm" user. QEMU's seccomp filter leaves ptrace, kill and process_vm_writev
// alone, so VMMs sharing a user could trace, signal or write into one another: a guest
// that took over its VMM would reach every other VM on the host. With one user each, it
// reaches nothing but its own descriptors. The cost is small because a VMM owns no file
// (it is handed open descriptors, see qemu.Command): a user is a number, claimed
// host-wide in ClaimDir/UID (naming the data dir and VM) and in the VM's record before
// the VMM starts, and released when the VM is destroyed or reaped and its cgroup is gone.

// UIDRange is the host user IDs VMMs run as; each VM's group ID is its user ID.
type UIDRange struct {
	First, Count uint32
}

// DefaultUIDs lies in the range systemd leaves unused (1879048192 to 2147483647, above
// the ranges it hands to containers), so it clashes with no account or container.
var DefaultUIDs = UIDRange{First: 1879048192, Count: 65536}

// ParseUIDRange reads "FIRST-LAST".
func ParseUIDRange(s string) (UIDRange, error) {
	a, b, ok := strings.Cut(s, "-")
	first, err1 := strconv.ParseUint(a, 10, 32)
	last, err2 := strconv.ParseUint(b, 10, 32)
	if !ok || err1 != nil || err2 != nil || first == 0 || last < first {
		return UIDRange{}, errdefs.Invalid("uid range %q: want FIRST-LAST, with 0 < FIRST <= LAST", s)
	}
	return UIDRange{First: uint32(first), Count: uint32(last-first) + 1}, nil
}

func (r UIDRange) String() string { return fmt.Sprintf("%d-%d", r.First, r.First+r.Count-1) }

// DefaultMemoryOverheadMiB is what a VM's cgroup allows beyond its RAM for the VMM
// itself. `make bench` measured QEMU under software emulation at about 180 MiB above
// guest RAM (its translation cache is 64 MiB of that); the rest is headroom for the host
// page cache of the VM's disks, which the cgroup is charged for.
const DefaultMemoryOverheadMiB = 256

// confined reports whether VMMs are confined: only root can start a process as another
// user or make cgroups. An unprivileged kiln's VMMs run as kiln's own user.
func confined() bool { return os.Geteuid() == 0 }

func (rt *Runtime) uids() UIDRange {
	if rt.UIDs.Count == 0 {
		return DefaultUIDs
	}
	return rt.UIDs
}

func (rt *Runtime) limitsOf(cfg vmm.Config) cgroup.Limits {
	over := rt.MemoryOverheadMiB
	if over == 0 {
		over = DefaultMemoryOverheadMiB
	}
	return cgroup.Limits{CPUs: cfg.CPUs, MemoryBytes: int64(cfg.MemoryMiB+over) << 20}
}

// ClaimDir holds every VMM user claim on this host, one file per uid naming the data dir
// and VM that hold it. It is one for all data dirs: they share the default --vm-uids
// range, and two VMMs of one uid, in two data dirs, could trace or kill each other. It is
// kept on disk, as suspended VMs' records are, so that a VM resumed after a reboot keeps
// its user. A variable for tests only.
var ClaimDir = "/var/lib/kiln/vmusers"

// claim is the content of a claim file.
type claim struct {
	DataDir string `json:"data_dir"`
	VM      string `json:"vm"`
}

// vmDir is the directory of the claiming VM; "" if the claim cannot name one.
func (c claim) vmDir() string {
	if !filepath.IsAbs(c.DataDir) || c.VM == "" || strings.ContainsAny(c.VM, "/") || c.VM == "." || c.VM == ".." {
		return ""
	}
	return filepath.Join(c.DataDir, "vms", c.VM)
}

// lockClaims takes the host-wide lock on ClaimDir: a claim is judged stale and removed
// in one step, never after another runtime has taken the uid again.
func lockClaims() (unlock func(), err error) {
	if err := os.MkdirAll(ClaimDir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(ClaimDir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", ClaimDir, err)
	}
	return func() { f.Close() }, nil
}

func claimPath(uid uint32) string {
	return filepath.Join(ClaimDir, strconv.FormatUint(uint64(uid), 10))
}

func readClaim(uid uint32) (claim, error) {
	var c claim
	b, err := os.ReadFile(claimPath(uid))
	if err != nil {
		return c, err
	}
	return c, json.Unmarshal(b, &c)
}

// writeClaim claims uid for c, unless it is claimed already (os.ErrExist).
func writeClaim(uid uint32, c claim) error {
	f, err := os.OpenFile(claimPath(uid), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	b, _ := json.Marshal(c)
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

func absDir(dir string) string {
	if abs, err := filepath.Abs(dir); err == nil {
		return abs
	}
	return dir
}

// claimUser picks a user no VM on this host holds, for VM id, and claims it. The claim
// names the VM, whose directory exists already, so a claim whose VM directory is gone
// and whose uid no process runs as is stale (sweepUsers).
func (rt *Runtime) claimUser(id string) (vmm.Confine, error) {
	unlock, err := lockClaims()
	if err != nil {
		return vmm.Confine{}, err
	}
	defer unlock()
	r := rt.uids()
	for i := uint32(0); i < r.Count; i++ {
		uid := r.First + i
		if _, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); err == nil {
			continue // a real account: never run a VMM as it
		}
		err := writeClaim(uid, claim{DataDir: absDir(rt.DataDir), VM: id})
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return vmm.Confine{}, err
		}
		return vmm.Confine{UID: uid, GID: uid, Groups: kvmGroup()}, nil
	}
	return vmm.Confine{}, errdefs.New(errdefs.ErrCapacity, "all %d VMM users (%s) are taken on this host: widen the uid range", r.Count, r)
}

// kvmGroup is the group that may open /dev/kvm, so that a VMM under KVM can.
func kvmGroup() []uint32 {
	fi, err := os.Stat("/dev/kvm")
	if err != nil {
		return nil
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Gid != 0 {
		return []uint32{st.Gid}
	}
	return nil
}

// releaseUser drops VM id's claim on uid, if it still holds it. Callers release a user
// only once the VM's cgroup is gone: until then its VMM may still run as that user.
func releaseUser(dataDir string, uid uint32, id string) {
	if uid == 0 {
		return
	}
	unlock, err := lockClaims()
	if err != nil {
		return
	}
	defer unlock()
	if c, err := readClaim(uid); err == nil && c == (claim{DataDir: absDir(dataDir), VM: id}) {
		os.Remove(claimPath(uid))
	}
}

// Claims lists the users claimed on this host by VMs of dataDir.
func Claims(dataDir string) ([]uint32, error) {
	unlock, err := lockClaims()
	if err != nil {
		return nil, err
	}
	defer unlock()
	var out []uint32
	for _, uid := range claimedUIDs() {
		if c, err := readClaim(uid); err == nil && c.DataDir == absDir(dataDir) {
			out = append(out, uid)
		}
	}
	return out, nil
}

func claimedUIDs() []uint32 {
	ents, _ := os.ReadDir(ClaimDir)
	var out []uint32
	for _, e := range ents {
		if uid, err := strconv.ParseUint(e.Name(), 10, 32); err == nil {
			out = append(out, uint32(uid))
		}
	}
	return out
}

// uidInUse reports whether any process on the host runs as uid (real, effective, saved
// or filesystem user). /proc/PID's owner will not do: a VMM that changed user is not
// dumpable, and its directory belongs to root.
func uidInUse(uid uint32) bool {
	want := strconv.FormatUint(uint64(uid), 10)
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", p.Name(), "status"))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if ids, ok := strings.CutPrefix(line, "Uid:"); ok {
				if slices.Contains(strings.Fields(ids), want) {
					return true
				}
				break
			}
		}
	}
	return false
}

// sweepUsers, under the lock, claims again the users of dataDir's VMs that hold none
// (claims made before they were host-wide), and removes claims, any data dir's, whose
// VM directory is gone and whose uid no process runs as: a kiln killed between claiming
// and recording, a VM whose cgroup could not be removed and whose VMM has since ended,
// a data dir deleted with its VMs.
func sweepUsers(dataDir string, log io.Writer) {
	unlock, err := lockClaims()
	if err != nil {
		fmt.Fprintf(log, "kiln: VMM users: %v\n", err)
		return
	}
	defer unlock()
	ents, _ := os.ReadDir(filepath.Join(dataDir, "vms"))
	for _, e := range ents {
		rec, err := readRecord(filepath.Join(dataDir, "vms", e.Name()))
		if err != nil || rec.Config.Confine.UID == 0 {
			continue
		}
		mine := claim{DataDir: absDir(dataDir), VM: rec.ID}
		uid := rec.Config.Confine.UID
		if err := writeClaim(uid, mine); errors.Is(err, os.ErrExist) {
			if c, _ := readClaim(uid); c != mine {
				fmt.Fprintf(log, "kiln: VM %s runs as user %d, which %s's VM %s also claims: destroy one of them\n", rec.ID, uid, c.DataDir, c.VM)
			}
		}
	}
	os.RemoveAll(filepath.Join(dataDir, "vmusers")) // where claims were kept before
	for _, uid := range claimedUIDs() {
		c, _ := readClaim(uid)
		if dir := c.vmDir(); dir != "" {
			if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
				continue
			}
		}
		if !uidInUse(uid) {
			os.Remove(claimPath(uid))
		}
	}
}

// makeCgroup creates the VM's cgroup, sized from cfg. Its name is in the record already.
func (rt *Runtime) makeCgroup(cfg vmm.Config) error {
	if cfg.Confine.Cgroup == "" {
		return nil
	}
	cg, err := cgroup.Host()
	if err != nil {
		return err
	}
	return cg.Create(cfg.Confine.Cgroup, rt.limitsOf(cfg))
}

// removeCgroup kills whatever is left in a VM's cgroup (a VMM whose handle was never
// recorded) and removes the group.
func removeCgroup(name string) error {
	if name == "" {
		return nil
	}
	cg, err := cgroup.Host()
	if err != nil {
		return err
	}
	pids, _ := cg.PIDs(name)
	for _, pid := range pids {
		if pid != os.Getpid() {
			vmm.KillAndWait(pid, vmm.ProcStart(pid), 5*time.Second)
		}
	}
	return cg.Remove(name)
}
