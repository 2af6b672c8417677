package agent

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/kilnhq/kiln/internal/guest"
)

// The agent reads processes from /proc itself: a tenant's image need not have ps, and
// what it has cannot lie to the host about what runs.

const (
	// userHZ is the unit of /proc's CPU times and start times. It is 100 on every Linux
	// kiln boots (x86-64, arm64); Go cannot ask sysconf without cgo.
	userHZ = 100
	// pfKthread marks a kernel thread in /proc/PID/stat's flags: not the tenant's, and
	// a guest has dozens, so they are left out as ps -e's users rarely want them.
	pfKthread = 0x00200000
	// maxFDs bounds the descriptors read per process to find its listening sockets, so a
	// process holding a million does not stall the list; listeners are opened early and
	// have low numbers.
	maxFDs = 4096
	// maxListeners bounds the listening sockets the agent remembers from /proc/net.
	maxListeners = 4 * guest.MaxProcs
)

// ps answers OpPs: a reply counting the processes, then one frame each.
func ps(w io.Writer, root string) {
	procs, err := readProcs(root)
	if err != nil {
		replyErr(w, guest.CodeInternal, "reading %s: %v", root, err)
		return
	}
	if err := reply(w, guest.Reply{Count: len(procs)}); err != nil {
		return
	}
	for _, p := range procs {
		if err := guest.WriteFrame(w, p); err != nil {
			return
		}
	}
}

// readProcs reads up to guest.MaxProcs processes from the proc filesystem at root, in
// PID order, leaving out kernel threads and processes that end while being read.
func readProcs(root string) ([]guest.ProcessStat, error) {
	uptime, err := readUptime(root)
	if err != nil {
		return nil, err
	}
	boot, err := readBootTime(root)
	if err != nil {
		return nil, err
	}
	listeners := readListeners(root)
	d, err := os.Open(root)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	var procs []guest.ProcessStat
	for len(procs) < guest.MaxProcs {
		ents, err := d.ReadDir(256)
		for _, e := range ents {
			pid, perr := strconv.ParseInt(e.Name(), 10, 32)
			if perr != nil || len(procs) == guest.MaxProcs {
				continue
			}
			p, ok := readProc(filepath.Join(root, e.Name()), int32(pid), uptime, boot, listeners)
			if ok {
				procs = append(procs, p.Bounded())
			}
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	// /proc lists in PID order already; a directory elsewhere (tests) need not.
	slices.SortFunc(procs, func(a, b guest.ProcessStat) int { return cmp.Compare(a.PID, b.PID) })
	return procs, nil
}

// readProc reads one process; false if it is a kernel thread or is gone.
func readProc(dir string, pid int32, uptime float64, boot int64, listeners map[uint64]guest.Socket) (guest.ProcessStat, bool) {
	stat, err := os.ReadFile(filepath.Join(dir, "stat"))
	if err != nil {
		return guest.ProcessStat{}, false
	}
	// comm is in parentheses and may hold anything, spaces and ')' included: the fields
	// that follow start after the last ')'.
	open, end := bytes.IndexByte(stat, '('), bytes.LastIndexByte(stat, ')')
	if open < 0 || end < open {
		return guest.ProcessStat{}, false
	}
	comm := string(stat[open+1 : end])
	f := strings.Fields(string(stat[end+1:]))
	// f[0] is field 3 of proc(5): state.
	field := func(n int) uint64 {
		if n-3 >= len(f) {
			return 0
		}
		v, _ := strconv.ParseUint(f[n-3], 10, 64)
		return v
	}
	if field(9)&pfKthread != 0 {
		return guest.ProcessStat{}, false
	}
	started := float64(field(22)) / userHZ
	p := guest.ProcessStat{
		PID:   pid,
		Start: boot + int64(started),
		Run:   uint64(max(uptime-started, 0)),
		CPUMS: (field(14) + field(15)) * 1000 / userHZ,
		RSS:   field(24) * uint64(os.Getpagesize()),
	}
	p.Command = readCmdline(filepath.Join(dir, "cmdline"))
	if p.Command == "" {
		p.Command = "[" + comm + "]"
	}
	p.Dir, _ = os.Readlink(filepath.Join(dir, "cwd"))
	if len(listeners) > 0 {
		p.Listen = socketsOf(filepath.Join(dir, "fd"), listeners)
	}
	return p, true
}

// readCmdline reads argv, at most what the list keeps of it: an argv may be megabytes.
func readCmdline(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	b, _ := io.ReadAll(io.LimitReader(f, guest.MaxProcString+1))
	return strings.TrimRight(string(bytes.ReplaceAll(b, []byte{0}, []byte{' '})), " ")
}

// socketsOf returns the listening sockets among the process's descriptors.
func socketsOf(fdDir string, listeners map[uint64]guest.Socket) []guest.Socket {
	d, err := os.Open(fdDir)
	if err != nil {
		return nil // another user's process, or gone
	}
	defer d.Close()
	names, _ := d.Readdirnames(maxFDs)
	var out []guest.Socket
	for _, n := range names {
		link, err := os.Readlink(filepath.Join(fdDir, n))
		if err != nil {
			continue
		}
		inode, ok := strings.CutPrefix(link, "socket:[")
		if !ok {
			continue
		}
		ino, err := strconv.ParseUint(strings.TrimSuffix(inode, "]"), 10, 64)
		if s, ok := listeners[ino]; err == nil && ok {
			out = append(out, s)
			if len(out) == guest.MaxProcSockets {
				break
			}
		}
	}
	return out
}

// readListeners maps socket inodes to the sockets listening in the guest's network
// namespace: TCP in LISTEN and unconnected UDP, from /proc/net.
func readListeners(root string) map[uint64]guest.Socket {
	m := map[uint64]guest.Socket{}
	for _, t := range []struct{ file, proto, state string }{
		{"tcp", "tcp", "0A"}, {"tcp6", "tcp", "0A"}, {"udp", "udp", "07"}, {"udp6", "udp", "07"},
	} {
		f, err := os.Open(filepath.Join(root, "net", t.file))
		if err != nil {
			continue // no IPv6, say
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // the heading
		for sc.Scan() && len(m) < maxListeners {
			// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
			fs := strings.Fields(sc.Text())
			if len(fs) < 10 || fs[3] != t.state {
				continue
			}
			addr, ok := parseProcAddr(fs[1])
			ino, err := strconv.ParseUint(fs[9], 10, 64)
			if !ok || err != nil || ino == 0 {
				continue
			}
			m[ino] = guest.Socket{Proto: t.proto, Address: addr.String()}
		}
		f.Close()
	}
	return m
}

// parseProcAddr parses /proc/net's "0100007F:1F90": the address as the kernel holds it
// (network order) printed as native-endian 32-bit words, then the port.
func parseProcAddr(s string) (netip.AddrPort, bool) {
	a, p, ok := strings.Cut(s, ":")
	raw, err := hex.DecodeString(a)
	port, perr := strconv.ParseUint(p, 16, 16)
	if !ok || err != nil || perr != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, false
	}
	for i := 0; i < len(raw); i += 4 {
		binary.NativeEndian.PutUint32(raw[i:], binary.BigEndian.Uint32(raw[i:]))
	}
	ip, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(ip.Unmap(), uint16(port)), true
}

func readUptime(root string) (float64, error) {
	b, err := os.ReadFile(filepath.Join(root, "uptime"))
	if err != nil {
		return 0, err
	}
	up, _, _ := strings.Cut(string(b), " ")
	return strconv.ParseFloat(up, 64)
}

// readBootTime is when the guest booted by its clock now (Unix seconds): /proc/stat's
// btime follows a clock set after boot, such as the host setting it on restore.
func readBootTime(root string) (int64, error) {
	b, err := os.ReadFile(filepath.Join(root, "stat"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, errors.New("no btime in /proc/stat")
}
