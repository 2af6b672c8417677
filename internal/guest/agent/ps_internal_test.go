package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/guest"
)

// fakeProc builds a proc filesystem under a temporary directory.
type fakeProc struct {
	t    *testing.T
	root string
}

func newFakeProc(t *testing.T) *fakeProc {
	f := &fakeProc{t: t, root: t.TempDir()}
	f.write("uptime", "1000.50 1900.00\n")
	f.write("stat", "cpu  1 2 3 4\nintr 5\nbtime 1700000000\nprocesses 9\n")
	return f
}

func (f *fakeProc) write(name, content string) {
	f.t.Helper()
	p := filepath.Join(f.root, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeProc) link(name, target string) {
	f.t.Helper()
	p := filepath.Join(f.root, name)
	os.MkdirAll(filepath.Dir(p), 0o755)
	if err := os.Symlink(target, p); err != nil {
		f.t.Fatal(err)
	}
}

// proc writes /proc/PID/stat with the fields ps reads (proc(5) numbering) and the rest 0.
func (f *fakeProc) proc(pid int, comm string, flags, utime, stime, start, rssPages uint64) {
	fields := make([]string, 52-2)
	for i := range fields {
		fields[i] = "0"
	}
	fields[0] = "S"
	set := func(n int, v uint64) { fields[n-3] = fmt.Sprint(v) }
	set(9, flags)
	set(14, utime)
	set(15, stime)
	set(22, start)
	set(24, rssPages)
	f.write(fmt.Sprintf("%d/stat", pid), fmt.Sprintf("%d (%s) %s\n", pid, comm, strings.Join(fields, " ")))
}

// /proc as the kernel writes it becomes the list the host gets: times, memory, the
// command line and directory, the sockets each process listens on (IPv4 and IPv6, TCP
// and UDP, not connected ones); kernel threads, vanished processes and non-process
// entries are left out, and long strings are cut to the list's bounds.
func TestReadProcsFake(t *testing.T) {
	f := newFakeProc(t)
	head := "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
	f.write("net/tcp", head+
		"   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0\n"+
		"   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0 100 0 0 10 0\n")
	f.write("net/tcp6", head+
		"   0: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0 100 0 0 10 0\n")
	f.write("net/udp", head+
		"  5: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 444 2 0 0\n")

	f.proc(1, "kiln-init", 0x400100, 30, 20, 500, 10)
	f.write("1/cmdline", "/sbin/init\x00")
	f.link("1/cwd", "/")
	f.link("1/fd/0", "/dev/null")
	f.link("1/fd/3", "socket:[111]") // listening
	f.link("1/fd/4", "socket:[222]") // a connection
	f.link("1/fd/5", "socket:[333]")
	f.link("1/fd/6", "socket:[444]")
	f.proc(2, "kthreadd", pfKthread, 0, 0, 0, 0)
	f.proc(42, "a) b", 0, 0, 0, 100, 1) // a comm with ')' and spaces; no argv: a zombie
	f.link("42/cwd", "/"+strings.Repeat("d", 3000))
	f.proc(43, "sh", 0, 0, 0, 100, 1)
	f.write("43/cmdline", "sh\x00-c\x00"+strings.Repeat("x", 100_000)+"\x00")
	os.MkdirAll(filepath.Join(f.root, "44"), 0o755) // gone while being read: no stat
	f.link("self", "1")
	os.MkdirAll(filepath.Join(f.root, "sys"), 0o755)

	procs, err := readProcs(f.root)
	if err != nil {
		t.Fatal(err)
	}
	var pids []int32
	byPID := map[int32]guest.ProcessStat{}
	for _, p := range procs {
		pids = append(pids, p.PID)
		byPID[p.PID] = p
	}
	if fmt.Sprint(pids) != "[1 42 43]" {
		t.Fatalf("pids %v, want [1 42 43]", pids)
	}
	p := byPID[1]
	want := guest.ProcessStat{PID: 1, Start: 1700000005, Run: 995, CPUMS: 500, RSS: 10 * uint64(os.Getpagesize()),
		Command: "/sbin/init", Dir: "/", Listen: []guest.Socket{{Proto: "tcp", Address: "0.0.0.0:8080"}, {Proto: "tcp", Address: "[::]:443"}, {Proto: "udp", Address: "127.0.0.1:53"}}}
	if fmt.Sprintf("%+v", p) != fmt.Sprintf("%+v", want) {
		t.Errorf("pid 1:\n got %+v\nwant %+v", p, want)
	}
	if p := byPID[42]; p.Command != "[a) b]" || len(p.Dir) != guest.MaxProcString {
		t.Errorf("pid 42: command %q, dir of %d bytes", p.Command, len(p.Dir))
	}
	if p := byPID[43]; len(p.Command) != guest.MaxProcString || !strings.HasPrefix(p.Command, "sh -c xxx") {
		t.Errorf("pid 43: command of %d bytes starting %.12q; want cut to %d", len(p.Command), p.Command, guest.MaxProcString)
	}
}

// However many processes there are, the list stops at guest.MaxProcs.
func TestReadProcsCapped(t *testing.T) {
	f := newFakeProc(t)
	for pid := 1; pid <= guest.MaxProcs+50; pid++ {
		f.proc(pid, "sleep", 0, 0, 0, 0, 0)
	}
	procs, err := readProcs(f.root)
	if err != nil {
		t.Fatal(err)
	}
	if len(procs) != guest.MaxProcs {
		t.Errorf("%d processes listed; want the cap, %d", len(procs), guest.MaxProcs)
	}
}
