// Package fctest is a test server for Firecracker's HTTP API. It enforces what
// Firecracker's published API enforces (request shapes with unknown fields refused,
// required fields, which calls are allowed before and after the guest starts, that a
// snapshot is taken only of a paused VM) and hands the calls that do something to a
// Backend. With the QEMU backend (cmd fake-firecracker) it boots real guests, so the
// Firecracker driver runs the whole conformance suite on hosts without Firecracker.
package fctest

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"

	fc "github.com/kilnhq/kiln/internal/vmm/firecracker"
)

// Config is what the API has configured before InstanceStart.
type Config struct {
	Machine fc.MachineConfig
	Boot    *fc.BootSource
	Drives  []fc.Drive
	Ifaces  []fc.NetworkInterface
	Vsock   *fc.Vsock
}

// Backend does what the API asks.
type Backend interface {
	Start(cfg Config) error
	CtrlAltDel() error
	Pause() error
	Resume() error
	SnapshotCreate(fc.SnapshotCreate) error
	SnapshotLoad(fc.SnapshotLoad) error
}

// Server is the API. Calls are served one at a time, as Firecracker's API thread does.
type Server struct {
	ID      string
	Backend Backend
	// Calls records every request line, for tests that check the order of calls.
	Calls []string
	// Log, if set, gets a line for each snapshot written, with its type.
	Log io.Writer
	// Jail, when set, is the chroot a jailer put this Firecracker in.
	Jail *Jail

	mu      sync.Mutex
	cfg     Config
	state   string // "Not started", "Running", "Paused"
	touched bool   // any pre-boot configuration done (forbids snapshot/load)
	dirty   bool   // dirty pages tracked: Diff snapshots allowed
}

// NewServer returns a server for a VM that has not started.
func NewServer(id string, b Backend) *Server {
	return &Server{ID: id, Backend: b, state: "Not started", cfg: Config{Machine: fc.MachineConfig{VCPUCount: 1, MemSizeMib: 128}}}
}

func fault(w http.ResponseWriter, code int, format string, args ...any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(fc.Fault{FaultMessage: fmt.Sprintf(format, args...)})
}

// decode reads a JSON body strictly: unknown fields and trailing data are errors.
func decode(r *http.Request, v any) error {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("An error occurred when deserializing the json body of a request: %v", err)
	}
	if dec.More() {
		return fmt.Errorf("An error occurred when deserializing the json body of a request: trailing data")
	}
	return nil
}

const (
	errAfterBoot  = "The requested operation is not supported after starting the microVM."
	errBeforeBoot = "The requested operation is not supported before starting the microVM."
)

func fileExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

// Jail is where the jailer (docs/jailer.md) confined Firecracker: it sees Root as "/" and
// runs as UID:GID. Every path the API is given is a path in the jail, and a file is of
// use only if that user may read it (or write it: a read-write drive, a snapshot's
// directory), so host paths and files left to root are refused as Firecracker would.
type Jail struct {
	Root     string
	UID, GID int
}

// access is what a jailed Firecracker needs of a path.
type access int

const (
	readFile   access = iota // an existing regular file to read
	writeFile                // an existing regular file to read and write
	createFile               // a file it makes, in a directory it may write
)

// resolve returns the host path of p as Firecracker would open it, checking that its
// user may. Outside a jail paths are the host's.
func (s *Server) resolve(p string, a access) (string, error) {
	if s.Jail == nil {
		if a != createFile && !fileExists(p) {
			return "", fmt.Errorf("no such file: %s", p)
		}
		return p, nil
	}
	host := filepath.Join(s.Jail.Root, filepath.Clean("/"+p))
	check, want := host, uint32(4)
	switch a {
	case writeFile:
		want = 6
	case createFile:
		check, want = filepath.Dir(host), 3
	}
	fi, err := os.Stat(check)
	if err != nil {
		return "", fmt.Errorf("%s is not in the jail (%s): %v", p, s.Jail.Root, err)
	}
	if (a == createFile) != fi.IsDir() {
		return "", fmt.Errorf("%s in the jail is not a %s", p, map[bool]string{true: "directory", false: "regular file"}[a == createFile])
	}
	st := fi.Sys().(*syscall.Stat_t)
	perm := uint32(fi.Mode().Perm())
	switch {
	case int(st.Uid) == s.Jail.UID:
		perm >>= 6
	case int(st.Gid) == s.Jail.GID:
		perm >>= 3
	}
	if perm&want != want {
		return "", fmt.Errorf("%s in the jail is %v, owned by %d:%d: user %d cannot use it", p, fi.Mode().Perm(), st.Uid, st.Gid, s.Jail.UID)
	}
	return host, nil
}

// tapUsable checks that Firecracker could attach to the TAP device: it must exist, and a
// jailed Firecracker, which has no CAP_NET_ADMIN, attaches only to a persistent TAP
// device its user owns.
func (s *Server) tapUsable(dev string) error {
	if s.Jail == nil {
		return nil
	}
	link, err := netlink.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("no TAP device %s: %v", dev, err)
	}
	tap, ok := link.(*netlink.Tuntap)
	if !ok || tap.Mode != netlink.TUNTAP_MODE_TAP {
		return fmt.Errorf("%s is a %s device, not a TAP device", dev, link.Type())
	}
	if int(tap.Owner) != s.Jail.UID {
		return fmt.Errorf("TAP device %s belongs to user %d, not to the jail's user %d", dev, tap.Owner, s.Jail.UID)
	}
	return nil
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Calls = append(s.Calls, r.Method+" "+r.URL.Path)
	preBoot := s.state == "Not started"
	path := r.URL.Path
	switch {
	case r.Method == "GET" && path == "/":
		json.NewEncoder(w).Encode(fc.InstanceInfo{AppName: "Firecracker", ID: s.ID, State: s.state, VMMVersion: "1.10.1-fctest"})
		return
	case r.Method == "GET" && path == "/machine-config":
		json.NewEncoder(w).Encode(s.cfg.Machine)
		return
	case r.Method == "PUT" && path == "/machine-config":
		var m fc.MachineConfig
		if err := decode(r, &m); err != nil {
			fault(w, 400, "%v", err)
			return
		}
		if !preBoot {
			fault(w, 400, errAfterBoot)
			return
		}
		if m.VCPUCount < 1 || m.VCPUCount > 32 || (m.SMT != nil && *m.SMT && m.VCPUCount > 1 && m.VCPUCount%2 == 1) {
			fault(w, 400, "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.")
			return
		}
		if m.MemSizeMib < 1 {
			fault(w, 400, "The memory size (MiB) is invalid.")
			return
		}
		s.cfg.Machine, s.touched = m, true
		s.dirty = m.TrackDirtyPages != nil && *m.TrackDirtyPages
	case r.Method == "PUT" && path == "/boot-source":
		var b fc.BootSource
		if err := decode(r, &b); err != nil {
			fault(w, 400, "%v", err)
			return
		}
		if !preBoot {
			fault(w, 400, errAfterBoot)
			return
		}
		var err error
		if b.KernelImagePath, err = s.resolve(b.KernelImagePath, readFile); err != nil {
			fault(w, 400, "The kernel file cannot be opened: %v", err)
			return
		}
		if b.InitrdPath != "" {
			if b.InitrdPath, err = s.resolve(b.InitrdPath, readFile); err != nil {
				fault(w, 400, "The initrd file cannot be opened: %v", err)
				return
			}
		}
		s.cfg.Boot, s.touched = &b, true
	case r.Method == "PUT" && strings.HasPrefix(path, "/drives/"):
		var d fc.Drive
		if err := decode(r, &d); err != nil {
			fault(w, 400, "%v", err)
			return
		}
		if !preBoot {
			fault(w, 400, errAfterBoot)
			return
		}
		if d.DriveID != strings.TrimPrefix(path, "/drives/") {
			fault(w, 400, "The id from the path [%s] does not match the id from the body [%s]!", strings.TrimPrefix(path, "/drives/"), d.DriveID)
			return
		}
		var err error
		if d.PathOnHost, err = s.resolve(d.PathOnHost, map[bool]access{true: readFile, false: writeFile}[d.IsReadOnly]); err != nil {
			fault(w, 400, "Unable to open the block device backing file: %v", err)
			return
		}
		replaced := false
		for i, old := range s.cfg.Drives {
			if old.DriveID == d.DriveID {
				s.cfg.Drives[i], replaced = d, true
			} else if d.IsRootDevice && old.IsRootDevice {
				fault(w, 400, "A root block device already exists!")
				return
			}
		}
		if !replaced {
			s.cfg.Drives = append(s.cfg.Drives, d)
		}
		s.touched = true
	case r.Method == "PUT" && strings.HasPrefix(path, "/network-interfaces/"):
		var n fc.NetworkInterface
		if err := decode(r, &n); err != nil {
			fault(w, 400, "%v", err)
			return
		}
		if !preBoot {
			fault(w, 400, errAfterBoot)
			return
		}
		if n.IfaceID != strings.TrimPrefix(path, "/network-interfaces/") || n.HostDevName == "" {
			fault(w, 400, "The iface_id must match the path and host_dev_name is required.")
			return
		}
		if err := s.tapUsable(n.HostDevName); err != nil {
			fault(w, 400, "Could not create the network device: %v", err)
			return
		}
		s.cfg.Ifaces, s.touched = append(s.cfg.Ifaces, n), true
	case r.Method == "PUT" && path == "/vsock":
		var v fc.Vsock
		if err := decode(r, &v); err != nil {
			fault(w, 400, "%v", err)
			return
		}
		if !preBoot {
			fault(w, 400, errAfterBoot)
			return
		}
		if v.GuestCID < 3 || v.UDSPath == "" {
			fault(w, 400, "guest_cid must be at least 3 and uds_path is required.")
			return
		}
		var err error
		if v.UDSPath, err = s.resolve(v.UDSPath, createFile); err != nil {
			fault(w, 400, "Cannot create the vsock socket: %v", err)
			return
		}
		s.cfg.Vsock, s.touched = &v, true
	case r.Method == "PUT" && path == "/actions":
		var a fc.Action
		if err := decode(r, &a); err != nil {
			fault(w, 400, "%v", err)
			return
		}
		switch a.ActionType {
		case "InstanceStart":
			if !preBoot {
				fault(w, 400, "The microVM is already running.")
				return
			}
			if s.cfg.Boot == nil {
				fault(w, 400, "Cannot start microvm that was not configured: missing kernel configuration.")
				return
			}
			if err := s.Backend.Start(s.cfg); err != nil {
				fault(w, 400, "Failed to start microVM: %v", err)
				return
			}
			s.state = "Running"
		case "SendCtrlAltDel":
			if preBoot {
				fault(w, 400, errBeforeBoot)
				return
			}
			if err := s.Backend.CtrlAltDel(); err != nil {
				fault(w, 400, "%v", err)
				return
			}
		case "FlushMetrics":
		default:
			fault(w, 400, "unknown variant `%s`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`", a.ActionType)
			return
		}
	case r.Method == "PATCH" && path == "/vm":
		var v fc.VMState
		if err := decode(r, &v); err != nil {
			fault(w, 400, "%v", err)
			return
		}
		if preBoot {
			fault(w, 400, errBeforeBoot)
			return
		}
		var err error
		switch v.State {
		case "Paused":
			err = s.Backend.Pause()
		case "Resumed":
			err = s.Backend.Resume()
			v.State = "Running"
		default:
			fault(w, 400, "unknown variant `%s`, expected `Paused` or `Resumed`", v.State)
			return
		}
		if err != nil {
			fault(w, 400, "%v", err)
			return
		}
		s.state = v.State
	case r.Method == "PUT" && path == "/snapshot/create":
		var c fc.SnapshotCreate
		if err := decode(r, &c); err != nil {
			fault(w, 400, "%v", err)
			return
		}
		if s.state != "Paused" {
			fault(w, 400, "Create snapshot error: the microVM must be paused (current state %s).", s.state)
			return
		}
		if c.SnapshotPath == "" || c.MemFilePath == "" || (c.SnapshotType != "" && c.SnapshotType != "Full" && c.SnapshotType != "Diff") {
			fault(w, 400, "snapshot_path and mem_file_path are required; snapshot_type is Full or Diff.")
			return
		}
		var err error
		for _, p := range []*string{&c.SnapshotPath, &c.MemFilePath} {
			if *p, err = s.resolve(*p, createFile); err != nil {
				fault(w, 400, "Create snapshot error: %v", err)
				return
			}
		}
		if c.SnapshotType == "Diff" && !s.dirty {
			fault(w, 400, "Create snapshot error: Diff snapshots are not enabled: set track_dirty_pages in the machine config or when loading the snapshot.")
			return
		}
		if err := s.Backend.SnapshotCreate(c); err != nil {
			fault(w, 400, "Create snapshot error: %v", err)
			return
		}
		if s.Log != nil {
			fmt.Fprintf(s.Log, "snapshot created: %s\n", cmp.Or(c.SnapshotType, "Full"))
		}
	case r.Method == "PUT" && path == "/snapshot/load":
		var l fc.SnapshotLoad
		if err := decode(r, &l); err != nil {
			fault(w, 400, "%v", err)
			return
		}
		if !preBoot || s.touched {
			fault(w, 400, "Loading a microVM snapshot not allowed after configuring boot-specific resources.")
			return
		}
		if l.SnapshotPath == "" || (l.MemBackend == nil) == (l.MemFilePath == "") {
			fault(w, 400, "snapshot_path and exactly one of mem_backend or mem_file_path are required.")
			return
		}
		if l.MemBackend != nil && l.MemBackend.BackendType != "File" && l.MemBackend.BackendType != "Uffd" {
			fault(w, 400, "unknown variant `%s`, expected `File` or `Uffd`", l.MemBackend.BackendType)
			return
		}
		var err error
		for _, p := range []*string{&l.SnapshotPath, &l.MemFilePath} {
			if *p != "" {
				if *p, err = s.resolve(*p, readFile); err != nil {
					fault(w, 400, "Load snapshot error: %v", err)
					return
				}
			}
		}
		if l.MemBackend != nil && l.MemBackend.BackendType == "File" {
			mb := *l.MemBackend
			if mb.BackendPath, err = s.resolve(mb.BackendPath, readFile); err != nil {
				fault(w, 400, "Load snapshot error: %v", err)
				return
			}
			l.MemBackend = &mb
		}
		if l.EnableDiffSnapshots && l.TrackDirtyPages != nil {
			fault(w, 400, "enable_diff_snapshots is deprecated: give only track_dirty_pages.")
			return
		}
		if err := s.Backend.SnapshotLoad(l); err != nil {
			fault(w, 400, "Load snapshot error: %v", err)
			return
		}
		s.dirty = l.EnableDiffSnapshots || (l.TrackDirtyPages != nil && *l.TrackDirtyPages)
		s.state = "Paused"
		if l.ResumeVM {
			s.state = "Running"
		}
	default:
		fault(w, 400, "Invalid request method and/or path: %s %s.", r.Method, path)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
