package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"golang.org/x/sys/unix"
)

// Request and response bodies of Firecracker's API (src/firecracker/swagger/firecracker.yaml),
// the subset kiln uses. The API test server in fctest decodes requests into these same
// types with unknown fields refused, as Firecracker does.

// InstanceInfo answers GET /.
type InstanceInfo struct {
	AppName    string `json:"app_name"`
	ID         string `json:"id"`
	State      string `json:"state"` // "Not started", "Running", "Paused"
	VMMVersion string `json:"vmm_version"`
}

// MachineConfig is PUT /machine-config.
type MachineConfig struct {
	VCPUCount       int   `json:"vcpu_count"`
	MemSizeMib      int   `json:"mem_size_mib"`
	SMT             *bool `json:"smt,omitempty"`
	TrackDirtyPages *bool `json:"track_dirty_pages,omitempty"`
}

// BootSource is PUT /boot-source.
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	InitrdPath      string `json:"initrd_path,omitempty"`
	BootArgs        string `json:"boot_args,omitempty"`
}

// Drive is PUT /drives/{drive_id}.
type Drive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   bool   `json:"is_read_only"`
	CacheType    string `json:"cache_type,omitempty"` // "Unsafe" or "Writeback"
}

// NetworkInterface is PUT /network-interfaces/{iface_id}.
type NetworkInterface struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	GuestMAC    string `json:"guest_mac,omitempty"`
}

// Vsock is PUT /vsock.
type Vsock struct {
	GuestCID int    `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// Action is PUT /actions.
type Action struct {
	ActionType string `json:"action_type"` // InstanceStart, SendCtrlAltDel, FlushMetrics
}

// VMState is PATCH /vm.
type VMState struct {
	State string `json:"state"` // Paused, Resumed
}

// SnapshotCreate is PUT /snapshot/create.
type SnapshotCreate struct {
	SnapshotType string `json:"snapshot_type,omitempty"` // Full, Diff
	SnapshotPath string `json:"snapshot_path"`
	MemFilePath  string `json:"mem_file_path"`
}

// MemBackend says where a snapshot's memory comes from.
type MemBackend struct {
	BackendType string `json:"backend_type"` // File, Uffd
	BackendPath string `json:"backend_path"`
}

// SnapshotLoad is PUT /snapshot/load.
type SnapshotLoad struct {
	SnapshotPath        string      `json:"snapshot_path"`
	MemBackend          *MemBackend `json:"mem_backend,omitempty"`
	MemFilePath         string      `json:"mem_file_path,omitempty"`         // deprecated form
	EnableDiffSnapshots bool        `json:"enable_diff_snapshots,omitempty"` // before Firecracker 1.8
	TrackDirtyPages     *bool       `json:"track_dirty_pages,omitempty"`
	ResumeVM            bool        `json:"resume_vm,omitempty"`
}

// Fault is the body of every error response.
type Fault struct {
	FaultMessage string `json:"fault_message"`
}

// client speaks to one Firecracker API socket.
type client struct {
	http *http.Client
}

func newClient(sock string, pid int) *client {
	return &client{http: &http.Client{
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				c, err := d.DialContext(ctx, "unix", sock)
				if err != nil {
					return nil, err
				}
				if err := peerIs(c, pid); err != nil {
					c.Close()
					return nil, err
				}
				return c, nil
			},
			DisableKeepAlives: true,
		},
		Timeout: 30 * time.Second,
	}}
}

// peerIs checks that the process at the other end of a Unix socket is pid (0: any). The
// sockets kiln dials are in a jail the VM's user may change, so a link there must not
// lead kiln, and an exec's bytes, to another process's socket.
func peerIs(c net.Conn, pid int) error {
	uc, ok := c.(*net.UnixConn)
	if pid == 0 || !ok {
		return nil
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("reading the socket's peer: %w", cerr)
	}
	if int(cred.Pid) != pid {
		return errdefs.New(errdefs.ErrUnavailable, "%s is served by process %d, not by the VMM (%d): refused", c.RemoteAddr(), cred.Pid, pid)
	}
	return nil
}

// APIError is a refused API call.
type APIError struct {
	Method, Path string
	Status       int
	Message      string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("firecracker %s %s: %d: %s", e.Method, e.Path, e.Status, e.Message)
}

func (c *client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		var f Fault
		b, _ := io.ReadAll(resp.Body)
		if json.Unmarshal(b, &f) != nil || f.FaultMessage == "" {
			f.FaultMessage = string(b)
		}
		return &APIError{Method: method, Path: path, Status: resp.StatusCode, Message: f.FaultMessage}
	}
	if out != nil {
		return json.NewDecoder(resp.Body).Decode(out)
	}
	return nil
}
