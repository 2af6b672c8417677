package cgroup

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// Usage reads the kernel's v2 files as they are laid out: CPU in microseconds, memory in
// bytes, I/O a line a device.
func TestV2Usage(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "kiln", "vm1")
	os.MkdirAll(dir, 0o755)
	for file, content := range map[string]string{
		"cpu.stat":       "usage_usec 3500000\nuser_usec 2500000\nsystem_usec 1000000\nnr_periods 0\n",
		"memory.current": "314572800\n",
		"io.stat":        "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n254:16 rbytes=512 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
	} {
		os.WriteFile(filepath.Join(dir, file), []byte(content), 0o644)
	}
	u, err := (&V2{Root: root}).Usage("kiln/vm1")
	if err != nil {
		t.Fatal(err)
	}
	want := Usage{UserSeconds: 2.5, SystemSeconds: 1, MemoryBytes: 300 << 20, IO: []IO{
		{Device: "8:0", Reads: 1, Writes: 2, ReadBytes: 4096, WriteBytes: 8192},
		{Device: "254:16", Reads: 1, ReadBytes: 512},
	}}
	if !reflect.DeepEqual(u, want) {
		t.Errorf("usage %+v, want %+v", u, want)
	}
	if _, err := (&V2{Root: root}).Usage("../x"); err == nil {
		t.Error("a name outside the hierarchy was read")
	}
}

// A VMM in no group of its own is counted from /proc: this process holds memory, and a
// process that is gone counts nothing.
func TestProcUsage(t *testing.T) {
	u := ProcUsage([]int{os.Getpid(), 1 << 30})
	if u.MemoryBytes <= 0 {
		t.Errorf("this process's usage: %+v", u)
	}
}
