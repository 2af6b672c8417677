package cgroup

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func randomName(t *testing.T) string {
	var b [4]byte
	rand.Read(b[:])
	return Name("test-" + hex.EncodeToString(b[:]))
}

func TestDetect(t *testing.T) {
	dir := t.TempDir()
	unified := filepath.Join(dir, "unified")
	os.MkdirAll(unified, 0o755)
	info := filepath.Join(dir, "mountinfo")
	hybrid := `30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
`
	hybrid = strings.ReplaceAll(hybrid, "/sys/fs/cgroup/unified", unified)
	os.WriteFile(info, []byte(hybrid), 0o644)
	mounts, err := readMounts(info)
	if err != nil {
		t.Fatal(err)
	}
	// The unified hierarchy offers no controllers: the v1 ones are used.
	m, err := detect(mounts)
	if err != nil {
		t.Fatal(err)
	}
	if v1, ok := m.(*V1); !ok || v1.CPU != "/sys/fs/cgroup/cpu,cpuacct" || v1.Memory != "/sys/fs/cgroup/memory" {
		t.Errorf("hybrid host: got %#v, want v1 with cpu,cpuacct and memory", m)
	}
	if _, err := detect(mounts[:1]); err == nil {
		t.Error("a host with no cpu or memory controller anywhere was accepted")
	}
	// Once the unified hierarchy has both controllers, it wins.
	os.WriteFile(filepath.Join(unified, "cgroup.controllers"), []byte("cpuset cpu io memory pids\n"), 0o644)
	if m, _ := detect(mounts); m == nil || m.Version() != 2 {
		t.Errorf("v2 host with controllers: got %#v, want v2", m)
	}
}

// The v2 adapter writes the limits and hands the controllers down, checked on a plain
// directory because this host's unified hierarchy has no controllers.
func TestV2Files(t *testing.T) {
	root := t.TempDir()
	m := &V2{Root: root}
	if err := m.Create("kiln/vm1", Limits{CPUs: 2, MemoryBytes: 768 << 20}); err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]string{
		"cgroup.subtree_control":      "+cpu +memory",
		"kiln/cgroup.subtree_control": "+cpu +memory",
		"kiln/vm1/cpu.max":            "200000 100000",
		"kiln/vm1/memory.max":         "805306368",
	} {
		if b, _ := os.ReadFile(filepath.Join(root, file)); string(b) != want {
			t.Errorf("%s = %q, want %q", file, b, want)
		}
	}
	if l, err := m.Limits("kiln/vm1"); err != nil || l != (Limits{CPUs: 2, MemoryBytes: 768 << 20}) {
		t.Errorf("limits read back: %+v %v", l, err)
	}
	for _, bad := range []string{"", "/kiln", "../x", "kiln/../../x"} {
		if err := m.Create(bad, Limits{CPUs: 1}); err == nil {
			t.Errorf("name %q accepted", bad)
		}
	}
}

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("creating cgroups needs root")
	}
}

// TestHost runs a process in a group of the host's own hierarchy (v1 on hybrid hosts).
func TestHost(t *testing.T) {
	requireRoot(t)
	m, err := Detect()
	if err != nil {
		t.Fatal(err)
	}
	name := randomName(t)
	want := Limits{CPUs: 1, MemoryBytes: 300 << 20}
	if err := m.Create(name, want); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Remove(name) })
	if err := m.Create(name, want); err != nil {
		t.Fatalf("a second Create of the same group: %v", err)
	}
	cmd := exec.Command("sleep", "60")
	if err := m.Start(name, cmd); err != nil {
		t.Fatal(err)
	}
	if g, err := m.Of(cmd.Process.Pid); err != nil || g != name {
		t.Errorf("v%d: process is in %q (%v), want %q", m.Version(), g, err, name)
	}
	if g, _ := m.Of(os.Getpid()); g == name {
		t.Error("the starting process moved into the group too")
	}
	if p, _ := m.PIDs(name); !slices.Equal(p, []int{cmd.Process.Pid}) {
		t.Errorf("PIDs = %v, want only %d", p, cmd.Process.Pid)
	}
	// No thread of the starting process stays behind in the group, whichever thread the
	// Go scheduler started it from (the main thread cannot exit).
	for range 50 {
		c := exec.Command("true")
		if err := m.Start(name, c); err != nil {
			t.Fatal(err)
		}
		c.Wait()
	}
	if p, _ := m.PIDs(name); slices.Contains(p, os.Getpid()) {
		t.Errorf("the test process is in the group: PIDs = %v", p)
	}
	if l, err := m.Limits(name); err != nil || l != want {
		t.Errorf("limits = %+v %v, want %+v", l, err, want)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if err := m.Remove(name); err != nil {
		t.Fatal(err)
	}
	if p, err := m.PIDs(name); err != nil || len(p) != 0 {
		t.Errorf("after Remove: %v %v", p, err)
	}
	if err := m.Remove(name); err != nil {
		t.Errorf("removing a group already gone: %v", err)
	}
}

// TestV2Start starts a process in a v2 group with CLONE_INTO_CGROUP, on the host's
// unified hierarchy even where it carries no controllers.
func TestV2Start(t *testing.T) {
	requireRoot(t)
	mounts, _ := readMounts("/proc/self/mountinfo")
	var root string
	for _, mt := range mounts {
		if mt.v2 {
			root = mt.dir
		}
	}
	if root == "" {
		t.Skip("no cgroup v2 hierarchy mounted")
	}
	m := &V2{Root: root}
	name := randomName(t)
	if err := os.MkdirAll(filepath.Join(root, name), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.Remove(name)
		os.Remove(filepath.Join(root, Parent)) // only if no other group is in it
	})
	cmd := exec.Command("sleep", "60")
	if err := m.Start(name, cmd); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if g, err := m.Of(cmd.Process.Pid); err != nil || g != name {
		t.Errorf("process is in %q (%v), want %q", g, err, name)
	}
}
