// Package cgroup holds each VM's VMM in a control group of its own, sized to the VM, so
// that a guest can take no more of the host than it was given. It creates, fills, reads
// and removes groups under one parent (Parent) on cgroup v2 where the host has the cpu and
// memory controllers there, and on cgroup v1 otherwise (hybrid hosts mount cpu and memory
// as v1 hierarchies and leave the unified one empty). vmrun is its one caller: it records
// a group's name before creating it, and removes it when the VM ends or is reaped.
package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Parent is the group under which kiln makes one group per VM ("kiln/<vm id>").
const Parent = "kiln"

// Period is the CPU accounting period; a VM gets CPUs × Period of CPU time in each.
const Period = 100 * time.Millisecond

// Limits are what one group enforces.
type Limits struct {
	CPUs        int   // whole CPUs of time per period
	MemoryBytes int64 // memory the group's processes may hold, page cache included
}

// Manager is one cgroup hierarchy. Names are relative to the hierarchy's root, such as
// "kiln/3f2a9c".
type Manager interface {
	// Version is 1 or 2.
	Version() int
	// Create makes the group (and its parents) if need be and sets its limits. It is
	// idempotent, so a resume after a host reboot makes the group again.
	Create(name string, l Limits) error
	// Start starts cmd inside the group: the process is there from its first instruction.
	Start(name string, cmd *exec.Cmd) error
	// Limits reads back what the group enforces.
	Limits(name string) (Limits, error)
	// Of returns the group pid is in.
	Of(pid int) (string, error)
	// PIDs lists the processes in the group; a group that is gone has none.
	PIDs(name string) ([]int, error)
	// Remove deletes the group once its processes are gone; a group already gone is not
	// an error.
	Remove(name string) error
	// Usage reads what the group's processes have used (for /metrics).
	Usage(name string) (Usage, error)
}

// Name is the group of VM id.
func Name(id string) string { return Parent + "/" + id }

// Detect returns the hierarchy to use on this host: v2 if its root offers both the cpu
// and memory controllers, else the v1 hierarchies of those controllers.
func Detect() (Manager, error) {
	mounts, err := readMounts("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	return detect(mounts)
}

// Host is Detect's answer, found once per process.
var Host = sync.OnceValues(Detect)

// mount is one cgroup filesystem from mountinfo.
type mount struct {
	dir     string
	v2      bool
	options []string // v1: the controllers it carries
}

func detect(mounts []mount) (Manager, error) {
	v1dirs := map[string]string{}
	for _, m := range mounts {
		if m.v2 {
			b, err := os.ReadFile(filepath.Join(m.dir, "cgroup.controllers"))
			if err == nil && hasAll(strings.Fields(string(b)), "cpu", "memory") {
				return &V2{Root: m.dir}, nil
			}
			continue
		}
		for _, o := range m.options {
			if (o == "cpu" || o == "memory") && v1dirs[o] == "" {
				v1dirs[o] = m.dir
			}
		}
	}
	if v1dirs["cpu"] != "" && v1dirs["memory"] != "" {
		return &V1{CPU: v1dirs["cpu"], Memory: v1dirs["memory"]}, nil
	}
	return nil, errdefs.New(errdefs.ErrMissingDependency,
		"no cgroup hierarchy with the cpu and memory controllers is mounted: kiln needs one to hold each VMM to its VM's size")
}

func hasAll(have []string, want ...string) bool {
	for _, w := range want {
		found := false
		for _, h := range have {
			found = found || h == w
		}
		if !found {
			return false
		}
	}
	return true
}

// readMounts lists the cgroup filesystems in a mountinfo file. Each line is
// "id parent major:minor root mountpoint options - fstype source superoptions".
func readMounts(path string) ([]mount, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []mount
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(qf) < 3 {
			continue
		}
		switch qf[0] {
		case "cgroup2":
			out = append(out, mount{dir: pf[4], v2: true})
		case "cgroup":
			out = append(out, mount{dir: pf[4], options: strings.Split(qf[2], ",")})
		}
	}
	return out, sc.Err()
}

// checkName refuses names that would leave the hierarchy or touch a control file.
func checkName(name string) error {
	if name == "" || filepath.IsAbs(name) || filepath.Clean(name) != name || strings.HasPrefix(name, "..") {
		return errdefs.Invalid("cgroup name %q must be a clean relative path", name)
	}
	return nil
}

func write(dir, file, value string) error {
	if err := os.WriteFile(filepath.Join(dir, file), []byte(value), 0o644); err != nil {
		return fmt.Errorf("setting %s of cgroup %s: %w", file, dir, err)
	}
	return nil
}

func readInt(dir, file string) (int64, error) {
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
}

// pids reads a cgroup.procs file; a group that is gone has no processes.
func pids(dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out, nil
}

// rmdir removes a group directory. The kernel refuses while the last process is still
// leaving (exit is not instant), so it retries for a moment.
func rmdir(dir string) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.Remove(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			p, _ := pids(dir)
			return fmt.Errorf("removing cgroup %s (processes %v): %w", dir, p, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// procCgroup reads /proc/PID/cgroup: hierarchy controllers ("cpu,cpuacct", or "" for v2)
// to the group path, without its leading slash.
func procCgroup(pid int) (map[string]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return nil, err
	}
	return parseCgroups(b), nil
}

func parseCgroups(b []byte) map[string]string {
	out := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) != 3 {
			continue
		}
		out[f[1]] = strings.TrimPrefix(f[2], "/")
	}
	return out
}
