package cgroup

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// V2 is a cgroup v2 (unified) hierarchy with the cpu and memory controllers.
type V2 struct {
	Root string // its mount point, usually /sys/fs/cgroup
}

var _ Manager = (*V2)(nil)

func (m *V2) Version() int { return 2 }

func (m *V2) Create(name string, l Limits) error {
	if err := checkName(name); err != nil {
		return err
	}
	// Each level above the group must hand the controllers down to its children.
	dir := m.Root
	for _, part := range strings.Split(name, "/") {
		if err := enable(dir, "cpu", "memory"); err != nil {
			return err
		}
		dir = filepath.Join(dir, part)
		if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
			return fmt.Errorf("creating cgroup %s: %w", dir, err)
		}
	}
	period := Period.Microseconds()
	if err := write(dir, "cpu.max", fmt.Sprintf("%d %d", int64(l.CPUs)*period, period)); err != nil {
		return err
	}
	return write(dir, "memory.max", strconv.FormatInt(l.MemoryBytes, 10))
}

// enable turns controllers on in dir's cgroup.subtree_control unless they already are.
func enable(dir string, ctrls ...string) error {
	b, _ := os.ReadFile(filepath.Join(dir, "cgroup.subtree_control"))
	on := strings.Fields(string(b))
	var add []string
	for _, c := range ctrls {
		if !hasAll(on, c) {
			add = append(add, "+"+c)
		}
	}
	if len(add) == 0 {
		return nil
	}
	return write(dir, "cgroup.subtree_control", strings.Join(add, " "))
}

// Start starts cmd directly inside the group (clone3 with CLONE_INTO_CGROUP).
func (m *V2) Start(name string, cmd *exec.Cmd) error {
	if err := checkName(name); err != nil {
		return err
	}
	f, err := os.Open(filepath.Join(m.Root, name))
	if err != nil {
		return fmt.Errorf("opening cgroup %s: %w", name, err)
	}
	defer f.Close()
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, int(f.Fd())
	return cmd.Start()
}

func (m *V2) Limits(name string) (Limits, error) {
	dir := filepath.Join(m.Root, name)
	b, err := os.ReadFile(filepath.Join(dir, "cpu.max"))
	if err != nil {
		return Limits{}, err
	}
	var l Limits
	if f := strings.Fields(string(b)); len(f) == 2 {
		quota, _ := strconv.ParseInt(f[0], 10, 64) // "max": no limit, 0 CPUs
		period, _ := strconv.ParseInt(f[1], 10, 64)
		if period > 0 {
			l.CPUs = int(quota / period)
		}
	}
	l.MemoryBytes, err = readInt(dir, "memory.max")
	return l, err
}

func (m *V2) Of(pid int) (string, error) {
	groups, err := procCgroup(pid)
	if err != nil {
		return "", err
	}
	g, ok := groups[""]
	if !ok {
		return "", fmt.Errorf("process %d has no cgroup v2 entry", pid)
	}
	return g, nil
}

func (m *V2) PIDs(name string) ([]int, error) { return pids(filepath.Join(m.Root, name)) }

func (m *V2) Remove(name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	return rmdir(filepath.Join(m.Root, name))
}
