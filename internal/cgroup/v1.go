package cgroup

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// V1 is a cgroup v1 host: the cpu and memory controllers each mounted as a hierarchy of
// its own (or both in one).
type V1 struct {
	CPU, Memory string // mount points of the hierarchies holding each controller
}

var _ Manager = (*V1)(nil)

func (m *V1) Version() int { return 1 }

// dirs are the group's directories, one per distinct hierarchy.
func (m *V1) dirs(name string) []string {
	if m.CPU == m.Memory {
		return []string{filepath.Join(m.CPU, name)}
	}
	return []string{filepath.Join(m.CPU, name), filepath.Join(m.Memory, name)}
}

func (m *V1) Create(name string, l Limits) error {
	if err := checkName(name); err != nil {
		return err
	}
	for _, d := range m.dirs(name) {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("creating cgroup %s: %w", d, err)
		}
	}
	cpu, mem := filepath.Join(m.CPU, name), filepath.Join(m.Memory, name)
	period := Period.Microseconds()
	if err := write(cpu, "cpu.cfs_period_us", strconv.FormatInt(period, 10)); err != nil {
		return err
	}
	if err := write(cpu, "cpu.cfs_quota_us", strconv.FormatInt(int64(l.CPUs)*period, 10)); err != nil {
		return err
	}
	return write(mem, "memory.limit_in_bytes", strconv.FormatInt(l.MemoryBytes, 10))
}

// Start moves the calling OS thread into the group, starts cmd from it (a child starts in
// its parent thread's groups, and v1 places threads one by one), and moves the thread back
// before the Go scheduler may use it again. Unlike moving the process after it started,
// nothing the VMM does escapes the limits. A thread that cannot be moved back is never
// unlocked, so that it ends with its goroutine; it must not stay in the group, where it
// would pin the group and have kiln itself counted against the VM.
func (m *V1) Start(name string, cmd *exec.Cmd) error {
	if err := checkName(name); err != nil {
		return err
	}
	if cmd.SysProcAttr != nil && cmd.SysProcAttr.Pdeathsig != 0 {
		// The parent-death signal fires when the starting thread ends.
		return fmt.Errorf("starting %s in cgroup %s: a parent-death signal cannot be combined with a v1 cgroup", cmd.Path, name)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		tid := strconv.Itoa(unix.Gettid())
		home, err := m.threadGroups()
		if err != nil {
			errc <- err
			return
		}
		moved := func(dirs []string) error {
			for _, d := range dirs {
				if err := write(d, "tasks", tid); err != nil {
					return err
				}
			}
			return nil
		}
		if err := moved(m.dirs(name)); err != nil {
			if moved(home) == nil {
				runtime.UnlockOSThread()
			}
			errc <- err
			return
		}
		err = cmd.Start()
		if moved(home) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// threadGroups are the directories of the calling thread's own cpu and memory groups.
func (m *V1) threadGroups() ([]string, error) {
	b, err := os.ReadFile("/proc/thread-self/cgroup")
	if err != nil {
		return nil, err
	}
	groups := parseCgroups(b)
	cpu, mem := m.groupsOf(groups)
	if m.CPU == m.Memory {
		return []string{filepath.Join(m.CPU, cpu)}, nil
	}
	return []string{filepath.Join(m.CPU, cpu), filepath.Join(m.Memory, mem)}, nil
}

// groupsOf picks the cpu and memory groups from /proc/PID/cgroup's entries.
func (m *V1) groupsOf(groups map[string]string) (cpu, mem string) {
	for ctrls, path := range groups {
		c := strings.Split(ctrls, ",")
		if slices.Contains(c, "cpu") {
			cpu = path
		}
		if slices.Contains(c, "memory") {
			mem = path
		}
	}
	return cpu, mem
}

func (m *V1) Limits(name string) (Limits, error) {
	cpu, mem := filepath.Join(m.CPU, name), filepath.Join(m.Memory, name)
	quota, err := readInt(cpu, "cpu.cfs_quota_us")
	if err != nil {
		return Limits{}, err
	}
	period, err := readInt(cpu, "cpu.cfs_period_us")
	if err != nil {
		return Limits{}, err
	}
	memb, err := readInt(mem, "memory.limit_in_bytes")
	if err != nil {
		return Limits{}, err
	}
	l := Limits{MemoryBytes: memb}
	if quota > 0 && period > 0 {
		l.CPUs = int(quota / period)
	}
	return l, nil
}

// Of returns pid's group in the cpu hierarchy, and fails if its memory group differs.
func (m *V1) Of(pid int) (string, error) {
	groups, err := procCgroup(pid)
	if err != nil {
		return "", err
	}
	cpu, mem := m.groupsOf(groups)
	if cpu != mem {
		return "", fmt.Errorf("process %d is in cpu cgroup %q but memory cgroup %q", pid, cpu, mem)
	}
	return cpu, nil
}

func (m *V1) PIDs(name string) ([]int, error) {
	var out []int
	for _, d := range m.dirs(name) {
		p, err := pids(d)
		if err != nil {
			return nil, err
		}
		for _, pid := range p {
			if !slices.Contains(out, pid) {
				out = append(out, pid)
			}
		}
	}
	return out, nil
}

func (m *V1) Remove(name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	for _, d := range m.dirs(name) {
		if err := rmdir(d); err != nil {
			return err
		}
	}
	return nil
}
