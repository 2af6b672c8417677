// Package guest is the host side of kiln's agent protocol and the wire types it shares
// with the guest agent (internal/guest/agent, run by cmd/kiln-init inside every VM).
//
// The transport is one byte stream per VM: a virtio-serial port under QEMU, a vsock
// connection under Firecracker. On it runs a yamux session opened by the host; every
// request is one yamux stream that starts with a length-prefixed JSON Header. yamux gives
// each stream its own flow-control window, so a guest process that writes faster than the
// host reads blocks in write(2) instead of filling memory, and several execs share one
// connection without waiting on each other.
//
// An exec uses up to four streams tied together by a random token: stdout, stderr and
// stdin carry raw bytes, the control stream carries the request, signals and resizes one
// way and the exit status the other way. Keeping data off the control stream means a
// process that never reads stdin cannot stop a signal from reaching it.
package guest

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strings"
	"unicode/utf8"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Version is the agent protocol version. Host and guest refuse to talk across versions:
// a guest built from another kiln release fails at connect time with a message saying so.
const Version = 1

// PortName is the virtio-serial port name the guest agent looks for under QEMU.
const PortName = "kiln.agent"

// VsockPort is the vsock port the guest agent listens on under Firecracker.
const VsockPort = 1024

// Op names a request.
type Op string

const (
	OpHello     Op = "hello"
	OpExec      Op = "exec"
	OpStdin     Op = "stdin"
	OpStdout    Op = "stdout"
	OpStderr    Op = "stderr"
	OpReadFile  Op = "read_file"
	OpWriteFile Op = "write_file"
	OpSync      Op = "sync"
	OpPowerOff  Op = "poweroff"
	// OpSpawn starts a supervised process (a machine's workload) whose output the guest
	// keeps, so that it runs on however often the host connects and disconnects.
	OpSpawn Op = "spawn"
	// OpFollow streams a supervised process's output from an offset, then its exit.
	OpFollow Op = "follow"
	// OpSignal delivers Header.Signal to a supervised process.
	OpSignal Op = "signal"
	// OpSetTime sets the guest's wall clock to Header.Time (Unix nanoseconds): a VM
	// restored from a snapshot wakes up with the clock it was saved with.
	OpSetTime Op = "set_time"
	// OpConnect connects the stream to the Unix socket at Header.Path in the guest (a
	// daemon's API, such as buildkitd's); after the reply the stream carries its bytes.
	OpConnect Op = "connect"
	// OpPs lists the guest's processes, read from its /proc (no ps binary is needed in
	// the image): a Reply whose Count says how many ProcessStat frames follow. Added to
	// v1 later; the host asks only an agent whose hello lists it in Ops.
	OpPs Op = "ps"
	// OpStats reports what only the guest knows of its own use, for /metrics: memory
	// from its /proc/meminfo, the load average, and statfs of its root and volume mounts.
	// A Reply, then one Stats frame. Added to v1 later, as OpPs was.
	OpStats Op = "stats"
)

// AddedOps are the operations added to protocol v1 after its first release, listed in
// the hello reply so the host can tell an agent from an older release (a machine booted
// before kiln was upgraded) from one that failed, without parsing its error text.
var AddedOps = []Op{OpPs, OpStats}

// Header opens every stream.
type Header struct {
	Version int          `json:"v"`
	Op      Op           `json:"op"`
	Token   string       `json:"token,omitempty"`
	Exec    *ExecRequest `json:"exec,omitempty"`
	Path    string       `json:"path,omitempty"`
	Mode    uint32       `json:"mode,omitempty"`
	// ID names a supervised process (spawn, follow).
	ID string `json:"id,omitempty"`
	// Offset is where follow starts in the output; Follow asks to wait for more.
	Offset int64 `json:"offset,omitempty"`
	Follow bool  `json:"follow,omitempty"`
	Signal int   `json:"signal,omitempty"`
	Time   int64 `json:"time,omitempty"`
	// RequestID is the id of the API call a request is made for (package reqid), which
	// the agent puts on its log line about it. Optional, so v1 still: agents decode
	// headers leniently, and one from before it ignores it.
	RequestID string `json:"request_id,omitempty"`
}

// Record is a piece of a supervised process's output, or its end.
type Record struct {
	Offset int64  `json:"o"` // of the first byte of Data in the whole output
	Stream int    `json:"s,omitempty"`
	Time   int64  `json:"t,omitempty"` // guest clock, Unix nanoseconds
	Data   []byte `json:"d,omitempty"`
	// Dropped says bytes before Offset were discarded to keep the buffer bounded.
	Dropped bool `json:"dropped,omitempty"`
	// Exit is set on the last record, once the process has ended.
	Exit *ExitStatus `json:"exit,omitempty"`
	// Running is set on the last record of a non-following read of a live process.
	Running bool `json:"running,omitempty"`
}

// ExecRequest describes a process to start in the guest.
type ExecRequest struct {
	Argv []string `json:"argv"`
	// Env is KEY=VALUE pairs added to a default environment (PATH, HOME, TERM).
	Env []string `json:"env,omitempty"`
	Dir string   `json:"dir,omitempty"`
	UID uint32   `json:"uid,omitempty"`
	GID uint32   `json:"gid,omitempty"`
	TTY bool     `json:"tty,omitempty"`
	// Rows and Cols size the TTY.
	Rows uint16 `json:"rows,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
	// TimeoutMS kills the process group after this long; 0 means no limit.
	TimeoutMS int64 `json:"timeout_ms,omitempty"`
	// Stdin says a stdin stream is attached; without it the process reads /dev/null.
	Stdin bool `json:"stdin,omitempty"`
	// Files are written before a spawned process starts (a machine's config.files).
	Files []File `json:"files,omitempty"`
}

// File is a file the agent writes before it spawns a process.
type File struct {
	Path string `json:"path"`
	Mode uint32 `json:"mode"`
	Data []byte `json:"data"`
}

// ErrCode classifies a guest-side failure so the host can map it without parsing text.
type ErrCode string

const (
	CodeNotFound ErrCode = "not_found"
	CodeInvalid  ErrCode = "invalid"
	CodeVersion  ErrCode = "version"
	CodeInternal ErrCode = "internal"
)

// Reply answers a Header.
type Reply struct {
	Error   string  `json:"error,omitempty"`
	Code    ErrCode `json:"code,omitempty"`
	Version int     `json:"v,omitempty"`
	PID     int     `json:"pid,omitempty"`
	Size    int64   `json:"size,omitempty"`
	Mode    uint32  `json:"mode,omitempty"`
	// Kernel and Init describe the guest in a hello reply.
	Kernel string `json:"kernel,omitempty"`
	// BootMS is the guest's CLOCK_BOOTTIME when kiln-init started and when the agent
	// became ready, so the host can split boot time into kernel and init.
	InitStartMS int64 `json:"init_start_ms,omitempty"`
	ReadyMS     int64 `json:"ready_ms,omitempty"`
	// Ops lists, in a hello reply, the AddedOps this agent serves.
	Ops []Op `json:"ops,omitempty"`
	// Count is how many frames follow a ps reply.
	Count int `json:"count,omitempty"`
}

// Serves says whether the agent that sent this hello reply serves op (one of AddedOps;
// the rest every v1 agent serves).
func (r *Reply) Serves(op Op) bool {
	for _, o := range r.Ops {
		if o == op {
			return true
		}
	}
	return false
}

// Control flows host → guest on an exec's control stream after it started.
type Control struct {
	Signal int      `json:"signal,omitempty"`
	Resize *WinSize `json:"resize,omitempty"`
}

// WinSize is a terminal size.
type WinSize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// ExitStatus flows guest → host once the process ended and its output was sent.
type ExitStatus struct {
	// Code is the exit code, or 128+Signal when a signal ended the process, as shells do.
	Code     int  `json:"code"`
	Signal   int  `json:"signal,omitempty"`
	TimedOut bool `json:"timed_out,omitempty"`
}

// maxFrame bounds one frame's JSON, and so the buffer a peer's length field can make the
// reader allocate: a length over it is refused before anything more is read. A guest can
// make the host hold at most this much per stream it is reading a frame from. Exec output
// and files travel as raw stream bytes; a supervised process's output comes in Records of
// at most 32 KiB of data each, well under the cap.
const maxFrame = 1 << 20

// WriteFrame writes v as one length-prefixed JSON frame.
func WriteFrame(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	// The peer refuses a frame over maxFrame by dropping the connection; say why here
	// instead (an exec whose arguments or environment are too large, say).
	if len(b) > maxFrame {
		return errdefs.Invalid("agent request of %d bytes encoded is over the %d-byte frame limit: send large input as stdin or a file instead", len(b), maxFrame)
	}
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(b)))
	_, err = w.Write(append(n[:], b...))
	return err
}

// ReadFrame reads one frame written by WriteFrame into v.
func ReadFrame(r io.Reader, v any) error {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return err
	}
	size := binary.BigEndian.Uint32(n[:])
	if size > maxFrame {
		return fmt.Errorf("agent frame of %d bytes exceeds %d: peer is not a kiln agent", size, maxFrame)
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(r, b); err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// Bounds of a process list (OpPs). The agent keeps to them and the host holds a guest to
// them whatever it sends: at most MaxProcs entries, strings cut to MaxProcString bytes,
// MaxProcSockets listening sockets each. The host so holds at most a few MiB of a list
// however hostile the guest; an honest guest's long command lines lose their tails.
const (
	MaxProcs       = 4096
	MaxProcString  = 1024
	MaxProcSockets = 32
)

// ProcessStat is one guest process, as the agent reads it from /proc.
type ProcessStat struct {
	PID int32 `json:"pid"`
	// Start is when it started (guest clock, Unix seconds); Run how long it has run
	// (seconds).
	Start int64  `json:"start"`
	Run   uint64 `json:"run"`
	// CPUMS is the CPU time it used, user and system, in milliseconds.
	CPUMS uint64 `json:"cpu_ms"`
	// RSS is its resident memory in bytes.
	RSS uint64 `json:"rss"`
	// Command is its argv joined by spaces ([comm] when it has none, as ps shows).
	Command string `json:"cmd"`
	Dir     string `json:"dir"`
	// Listen are the sockets it listens on: TCP in LISTEN, unconnected UDP.
	Listen []Socket `json:"listen,omitempty"`
}

// Socket is a listening socket: Proto "tcp" or "udp", Address host:port ([::]:80 for
// IPv6).
type Socket struct {
	Proto   string `json:"proto"`
	Address string `json:"address"`
}

// Bounded returns p cut to the list's bounds. Both ends call it: the agent so an honest
// answer fits, the host so a hostile one cannot make it hold more.
func (p ProcessStat) Bounded() ProcessStat {
	p.Command = cut(p.Command, MaxProcString)
	p.Dir = cut(p.Dir, MaxProcString)
	if len(p.Listen) > MaxProcSockets {
		p.Listen = p.Listen[:MaxProcSockets]
	}
	// A copy, so the host keeps none of the decoded frame's larger backing arrays.
	listen := make([]Socket, len(p.Listen))
	for i, s := range p.Listen {
		// Longest honest address: [ffff:…:ffff%iface]:65535, under 64 bytes.
		listen[i] = Socket{Proto: cut(s.Proto, 8), Address: cut(s.Address, 64)}
	}
	p.Listen = listen
	return p
}

// Bounds of a Stats answer (OpStats): at most MaxMounts filesystems, mount paths cut to
// MaxMountPath bytes. Each becomes a labelled series on /metrics, so the bound is what a
// hostile guest can add to a scrape. The host reads at most MaxStatsBytes of the answer.
const (
	MaxMounts     = 16
	MaxMountPath  = 256
	MaxStatsBytes = 64 << 10
)

// Stats is the guest's own view of its use (OpStats), the part the host cannot read
// from the VMM's cgroup: what the guest's kernel counts as available memory, its run
// queue, and how full its filesystems are.
type Stats struct {
	// Memory is from /proc/meminfo, in bytes.
	MemTotal     uint64 `json:"mem_total"`
	MemFree      uint64 `json:"mem_free"`
	MemAvailable uint64 `json:"mem_available"`
	Buffers      uint64 `json:"buffers"`
	Cached       uint64 `json:"cached"`
	// Load is /proc/loadavg's 1, 5 and 15 minute averages.
	Load        [3]float64   `json:"load"`
	Filesystems []Filesystem `json:"fs,omitempty"`
}

// Filesystem is statfs of one mount: Blocks of BlockSize bytes, BlocksFree of them free,
// BlocksAvail free to unprivileged users.
type Filesystem struct {
	Mount       string `json:"mount"`
	Blocks      uint64 `json:"blocks"`
	BlocksFree  uint64 `json:"blocks_free"`
	BlocksAvail uint64 `json:"blocks_avail"`
	BlockSize   uint64 `json:"block_size"`
}

// Bounded returns s held to the answer's bounds, with load averages no kernel reports
// (negative, infinite, NaN, which JSON cannot carry) read as 0. Both ends call it, as
// ProcessStat.Bounded.
func (s Stats) Bounded() Stats {
	for i, l := range s.Load {
		if !(l >= 0) || math.IsInf(l, 1) {
			s.Load[i] = 0
		}
	}
	fs := make([]Filesystem, 0, min(len(s.Filesystems), MaxMounts))
	for _, f := range s.Filesystems[:min(len(s.Filesystems), MaxMounts)] {
		f.Mount = cut(strings.ToValidUTF8(f.Mount, "?"), MaxMountPath)
		fs = append(fs, f)
	}
	s.Filesystems = fs
	return s
}

// cut returns s cut to at most n bytes, at a UTF-8 boundary, copied so the part kept
// does not pin the whole in memory.
func cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return strings.Clone(s[:n])
}
