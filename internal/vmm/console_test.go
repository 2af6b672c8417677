package vmm_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/vmm"
)

// A console that writes far more than the cap leaves two files of at most half of it
// each, holding the newest output; the tail spans both files and reads only the end.
func TestCaptureConsoleCapped(t *testing.T) {
	old := vmm.ConsoleLogCap
	vmm.ConsoleLogCap = 64 << 10
	defer func() { vmm.ConsoleLogCap = old }()
	path := filepath.Join(t.TempDir(), "console.log")
	var in bytes.Buffer
	for i := 0; in.Len() < 1<<20; i++ {
		in.WriteString(strings.Repeat("x", i%97) + "\n")
	}
	in.WriteString("the last line\n")
	if err := vmm.CaptureConsole(&in, path); err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, p := range []string{path, path + ".1"} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size() > vmm.ConsoleLogCap/2 {
			t.Errorf("%s holds %d bytes, above half the cap %d", p, fi.Size(), vmm.ConsoleLogCap)
		}
		total += fi.Size()
	}
	if total < vmm.ConsoleLogCap/2 {
		t.Errorf("only %d bytes kept of a cap of %d", total, vmm.ConsoleLogCap)
	}
	cur, _ := os.ReadFile(path)
	prev, _ := os.ReadFile(path + ".1")
	all := append(prev, cur...)
	for _, n := range []int64{10, int64(len(cur)), int64(len(cur)) + 100, 1 << 30} {
		got := vmm.ConsoleTail(path, n)
		want := all[max(int64(len(all))-n, 0):]
		if !bytes.Equal(got, want) || !bytes.HasSuffix(got, []byte("last line\n")) {
			t.Errorf("tail of %d: %d bytes, want %d ending with the last line", n, len(got), len(want))
		}
	}
	// A later capture (kiln restarted) appends and keeps the cap.
	if err := vmm.CaptureConsole(strings.NewReader(strings.Repeat("y", 40<<10)), path); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, path + ".1"} {
		if fi, _ := os.Stat(p); fi.Size() > vmm.ConsoleLogCap/2 {
			t.Errorf("after a second capture %s holds %d bytes", p, fi.Size())
		}
	}
	if vmm.ConsoleTail(filepath.Join(t.TempDir(), "none"), 10) != nil {
		t.Error("tail of a missing log")
	}
}
