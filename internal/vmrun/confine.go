package vmrun

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
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
// (it is handed open descriptors, see qemu.Command): a user is a number, claimed in
// DATA_DIR/vmusers/UID (naming the VM) and in the VM's record before the VMM starts, and
// released when the VM is destroyed or reaped.

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

func usersDir(dataDir string) string { return filepath.Join(dataDir, "vmusers") }

// claimUser picks a free user for VM id and claims it. The claim names the VM, whose
// directory exists already, so a claim whose VM directory is gone is stale (Reap).
func (rt *Runtime) claimUser(id string) (vmm.Confine, error) {
	dir := usersDir(rt.DataDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return vmm.Confine{}, err
	}
	r := rt.uids()
	for i := uint32(0); i < r.Count; i++ {
		uid := r.First + i
		if _, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); err == nil {
			continue // a real account: never run a VMM as it
		}
		f, err := os.OpenFile(filepath.Join(dir, strconv.FormatUint(uint64(uid), 10)), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return vmm.Confine{}, err
		}
		_, err = f.WriteString(id)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(f.Name())
			return vmm.Confine{}, err
		}
		return vmm.Confine{UID: uid, GID: uid, Groups: kvmGroup()}, nil
	}
	return vmm.Confine{}, errdefs.New(errdefs.ErrCapacity, "all %d VMM users (%s) are taken: widen the uid range", r.Count, r)
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

// releaseUser drops VM id's claim on uid, if it still holds it.
func releaseUser(dataDir string, uid uint32, id string) {
	if uid == 0 {
		return
	}
	p := filepath.Join(usersDir(dataDir), strconv.FormatUint(uint64(uid), 10))
	if b, err := os.ReadFile(p); err == nil && string(b) == id {
		os.Remove(p)
	}
}

// sweepUsers removes claims whose VM directory is gone (a kiln killed between claiming
// and recording, or between removing a VM directory and its claim).
func sweepUsers(dataDir string) {
	ents, _ := os.ReadDir(usersDir(dataDir))
	for _, e := range ents {
		p := filepath.Join(usersDir(dataDir), e.Name())
		b, err := os.ReadFile(p)
		if err != nil || strings.ContainsAny(string(b), "/.") {
			continue
		}
		if _, err := os.Stat(filepath.Join(dataDir, "vms", string(b))); os.IsNotExist(err) {
			os.Remove(p)
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
