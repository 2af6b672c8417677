package agent

import (
	"bufio"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/guest"
)

// stats answers OpStats: a reply, then the guest's memory, load and filesystems, read
// from the proc filesystem at root and statfs of mounts.
func stats(w io.Writer, root string, mounts []string) {
	st, err := readStats(root, mounts)
	if err != nil {
		replyErr(w, guest.CodeInternal, "reading %s: %v", root, err)
		return
	}
	if err := reply(w, guest.Reply{}); err != nil {
		return
	}
	guest.WriteFrame(w, st.Bounded())
}

// readStats reads meminfo and loadavg under root and statfs of each mount; a mount that
// cannot be read (unmounted meanwhile) is left out.
func readStats(root string, mounts []string) (guest.Stats, error) {
	var st guest.Stats
	b, err := os.ReadFile(filepath.Join(root, "meminfo"))
	if err != nil {
		return st, err
	}
	parseMeminfo(b, &st)
	b, err = os.ReadFile(filepath.Join(root, "loadavg"))
	if err != nil {
		return st, err
	}
	st.Load = parseLoadavg(b)
	for _, m := range mounts[:min(len(mounts), guest.MaxMounts)] {
		var fs unix.Statfs_t
		if unix.Statfs(m, &fs) != nil {
			continue
		}
		st.Filesystems = append(st.Filesystems, guest.Filesystem{Mount: m, Blocks: fs.Blocks, BlocksFree: fs.Bfree,
			BlocksAvail: fs.Bavail, BlockSize: uint64(fs.Bsize)})
	}
	return st, nil
}

// parseMeminfo reads the lines of /proc/meminfo kiln reports ("MemAvailable:  123 kB"),
// in bytes.
func parseMeminfo(b []byte, st *guest.Stats) {
	fields := map[string]*uint64{"MemTotal": &st.MemTotal, "MemFree": &st.MemFree, "MemAvailable": &st.MemAvailable,
		"Buffers": &st.Buffers, "Cached": &st.Cached}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		dst := fields[name]
		if !ok || dst == nil {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			continue
		}
		if len(f) > 1 && f[1] == "kB" {
			v *= 1024
		}
		*dst = v
	}
}

// parseLoadavg reads /proc/loadavg's first three fields: "0.52 0.58 0.59 1/467 12345".
func parseLoadavg(b []byte) [3]float64 {
	var load [3]float64
	f := strings.Fields(string(b))
	for i := range min(3, len(f)) {
		load[i], _ = strconv.ParseFloat(f[i], 64)
	}
	return load
}
