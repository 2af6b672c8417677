package cgroup

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Usage is what a group's processes have used since the group was made: CPU time, the
// memory charged to it now, and (where the hierarchy accounts for it) block I/O.
type Usage struct {
	UserSeconds, SystemSeconds float64
	MemoryBytes                int64
	IO                         []IO
}

// IO is a group's I/O on one block device, named by its numbers ("8:0").
type IO struct {
	Device                string
	Reads, Writes         uint64
	ReadBytes, WriteBytes uint64
}

// userHZ is the unit of CPU times in /proc/PID/stat and cpuacct.stat: USER_HZ, which is
// 100 on every Linux architecture kiln runs on.
const userHZ = 100

func (m *V2) Usage(name string) (Usage, error) {
	if err := checkName(name); err != nil {
		return Usage{}, err
	}
	dir := filepath.Join(m.Root, name)
	var u Usage
	stat, err := keyed(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return u, err
	}
	u.UserSeconds, u.SystemSeconds = float64(stat["user_usec"])/1e6, float64(stat["system_usec"])/1e6
	if u.MemoryBytes, err = readInt(dir, "memory.current"); err != nil {
		return u, err
	}
	// io.stat: "8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0", a line a device; the
	// io controller may be off for the group, and then there is none.
	b, _ := os.ReadFile(filepath.Join(dir, "io.stat"))
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		io := IO{Device: f[0]}
		for _, kv := range f[1:] {
			k, v, _ := strings.Cut(kv, "=")
			n, _ := strconv.ParseUint(v, 10, 64)
			switch k {
			case "rbytes":
				io.ReadBytes = n
			case "wbytes":
				io.WriteBytes = n
			case "rios":
				io.Reads = n
			case "wios":
				io.Writes = n
			}
		}
		u.IO = append(u.IO, io)
	}
	return u, nil
}

// Usage on v1 reads memory from the memory hierarchy and CPU from cpuacct where it is
// mounted with cpu; else (kiln makes groups in cpu and memory only) from its processes.
// kiln makes no blkio groups, so there is no I/O.
func (m *V1) Usage(name string) (Usage, error) {
	if err := checkName(name); err != nil {
		return Usage{}, err
	}
	var u Usage
	var err error
	if u.MemoryBytes, err = readInt(filepath.Join(m.Memory, name), "memory.usage_in_bytes"); err != nil {
		return u, err
	}
	if stat, err := keyed(filepath.Join(m.CPU, name, "cpuacct.stat")); err == nil {
		u.UserSeconds, u.SystemSeconds = float64(stat["user"])/userHZ, float64(stat["system"])/userHZ
		return u, nil
	}
	pids, err := m.PIDs(name)
	if err != nil {
		return u, err
	}
	p := ProcUsage(pids)
	u.UserSeconds, u.SystemSeconds = p.UserSeconds, p.SystemSeconds
	return u, nil
}

// ProcUsage sums the CPU time and resident memory of processes (threads included), for
// a VMM that runs in no group of its own. A process that is gone counts nothing.
func ProcUsage(pids []int) Usage {
	var u Usage
	page := int64(os.Getpagesize())
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// The command name, in parentheses, may hold spaces: fields count after it.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 22 {
			continue
		}
		// After the name: state(3) ... utime(14) stime(15) ... rss(24), 1-based in proc(5).
		ut, _ := strconv.ParseUint(f[11], 10, 64)
		st, _ := strconv.ParseUint(f[12], 10, 64)
		rss, _ := strconv.ParseInt(f[21], 10, 64)
		u.UserSeconds += float64(ut) / userHZ
		u.SystemSeconds += float64(st) / userHZ
		u.MemoryBytes += rss * page
	}
	return u
}

// keyed reads a file of "key value" lines.
func keyed(path string) (map[string]uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]uint64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		n, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		out[k] = n
	}
	return out, sc.Err()
}
