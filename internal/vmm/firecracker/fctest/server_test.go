package fctest_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	fc "github.com/kilnhq/kiln/internal/vmm/firecracker"
	"github.com/kilnhq/kiln/internal/vmm/firecracker/fctest"
)

// call sends one API request and returns its status and fault message.
func call(t *testing.T, url, method, path, body string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url+path, strings.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var f fc.Fault
	json.NewDecoder(resp.Body).Decode(&f)
	return resp.StatusCode, f.FaultMessage
}

type recorder struct{ calls []string }

func (r *recorder) Start(fctest.Config) error { r.calls = append(r.calls, "start"); return nil }
func (r *recorder) CtrlAltDel() error         { r.calls = append(r.calls, "cad"); return nil }
func (r *recorder) Pause() error              { r.calls = append(r.calls, "pause"); return nil }
func (r *recorder) Resume() error             { r.calls = append(r.calls, "resume"); return nil }
func (r *recorder) SnapshotCreate(fc.SnapshotCreate) error {
	r.calls = append(r.calls, "snapshot")
	return nil
}
func (r *recorder) SnapshotLoad(fc.SnapshotLoad) error { r.calls = append(r.calls, "load"); return nil }

func TestAPIRules(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinux")
	os.WriteFile(kernel, []byte("k"), 0o644)
	rec := &recorder{}
	srv := httptest.NewServer(fctest.NewServer("vm1", rec))
	defer srv.Close()

	steps := []struct {
		method, path, body string
		status             int
		fault              string
	}{
		{"PATCH", "/vm", `{"state":"Paused"}`, 400, "before starting"},
		{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":128,"bogus":true}`, 400, "unknown field"},
		{"PUT", "/machine-config", `{"vcpu_count":0,"mem_size_mib":128}`, 400, "vCPU"},
		{"PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":256,"smt":false}`, 204, ""},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 400, "missing kernel"},
		{"PUT", "/boot-source", `{"kernel_image_path":"/nonexistent"}`, 400, "kernel file"},
		{"PUT", "/boot-source", `{"kernel_image_path":"` + kernel + `","boot_args":"console=ttyS0"}`, 204, ""},
		{"PUT", "/drives/disk0", `{"drive_id":"disk1","path_on_host":"` + kernel + `","is_root_device":false,"is_read_only":true}`, 400, "does not match"},
		{"PUT", "/drives/disk0", `{"drive_id":"disk0","path_on_host":"` + kernel + `","is_root_device":false,"is_read_only":true}`, 204, ""},
		{"PUT", "/vsock", `{"guest_cid":2,"uds_path":"/tmp/v.sock"}`, 400, "guest_cid"},
		{"PUT", "/vsock", `{"guest_cid":3,"uds_path":"/tmp/v.sock"}`, 204, ""},
		{"PUT", "/snapshot/load", `{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"}}`, 400, "not allowed after configuring"},
		{"PUT", "/actions", `{"action_type":"Reboot"}`, 400, "unknown variant"},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 204, ""},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 400, "already running"},
		{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":128}`, 400, "after starting"},
		{"PUT", "/drives/disk1", `{"drive_id":"disk1","path_on_host":"` + kernel + `","is_root_device":false,"is_read_only":true}`, 400, "after starting"},
		{"PUT", "/snapshot/create", `{"snapshot_type":"Full","snapshot_path":"/s","mem_file_path":"/m"}`, 400, "must be paused"},
		{"PATCH", "/vm", `{"state":"Paused"}`, 204, ""},
		{"PUT", "/snapshot/create", `{"snapshot_type":"Full","snapshot_path":"/s"}`, 400, "mem_file_path"},
		{"PUT", "/snapshot/create", `{"snapshot_type":"Diff","snapshot_path":"/s","mem_file_path":"/m"}`, 400, "Diff snapshots are not enabled"},
		{"PUT", "/snapshot/create", `{"snapshot_type":"Full","snapshot_path":"/s","mem_file_path":"/m"}`, 204, ""},
		{"PATCH", "/vm", `{"state":"Resumed"}`, 204, ""},
		{"PUT", "/actions", `{"action_type":"SendCtrlAltDel"}`, 204, ""},
		{"DELETE", "/vm", ``, 400, "Invalid request"},
	}
	for i, s := range steps {
		status, fault := call(t, srv.URL, s.method, s.path, s.body)
		if status != s.status || !strings.Contains(fault, s.fault) {
			t.Errorf("step %d %s %s %s: %d %q; want %d with %q", i, s.method, s.path, s.body, status, fault, s.status, s.fault)
		}
	}
	if got := strings.Join(rec.calls, ","); got != "start,pause,snapshot,resume,cad" {
		t.Errorf("backend calls %s", got)
	}
	resp, _ := http.Get(srv.URL + "/")
	var info fc.InstanceInfo
	json.NewDecoder(resp.Body).Decode(&info)
	if info.State != "Running" || info.ID != "vm1" {
		t.Errorf("instance info %+v", info)
	}
}

// TestJailPaths: a jailed Firecracker sees only its jail, as its user. Host paths, files
// its user may not read (or write, for a read-write drive) and directories it may not
// write are refused; paths inside the jail that it may use are taken, relative to the
// jail's root.
func TestJailPaths(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("giving files to another user needs root")
	}
	const uid = 4242
	root := t.TempDir()
	os.Chmod(root, 0o755)
	hostKernel := filepath.Join(t.TempDir(), "vmlinux")
	os.WriteFile(hostKernel, []byte("k"), 0o644)
	write := func(name string, mode os.FileMode, owner int) {
		os.WriteFile(filepath.Join(root, name), []byte(name), mode)
		os.Chown(filepath.Join(root, name), owner, owner)
	}
	write("vmlinux", 0o644, 0)
	write("private", 0o600, 0)
	write("data.ext4", 0o644, 0)
	write("mine.ext4", 0o600, uid)
	os.Mkdir(filepath.Join(root, "run"), 0o755)
	os.Mkdir(filepath.Join(root, "snapshot"), 0o700)
	os.Chown(filepath.Join(root, "snapshot"), uid, uid)

	rec := &recorder{}
	api := fctest.NewServer("vm1", rec)
	api.Jail = &fctest.Jail{Root: root, UID: uid, GID: uid}
	srv := httptest.NewServer(api)
	defer srv.Close()
	for _, s := range []struct {
		method, path, body string
		status             int
	}{
		{"PUT", "/boot-source", `{"kernel_image_path":"` + hostKernel + `"}`, 400},                                              // a host path
		{"PUT", "/boot-source", `{"kernel_image_path":"/private"}`, 400},                                                        // root's, 0600
		{"PUT", "/boot-source", `{"kernel_image_path":"/../../vmlinux"}`, 204},                                                  // stays in the jail
		{"PUT", "/drives/d0", `{"drive_id":"d0","path_on_host":"/data.ext4","is_root_device":false,"is_read_only":false}`, 400}, // cannot write it
		{"PUT", "/drives/d0", `{"drive_id":"d0","path_on_host":"/data.ext4","is_root_device":false,"is_read_only":true}`, 204},
		{"PUT", "/drives/d1", `{"drive_id":"d1","path_on_host":"/mine.ext4","is_root_device":false,"is_read_only":false}`, 204},
		{"PUT", "/network-interfaces/eth0", `{"iface_id":"eth0","host_dev_name":"kiln-no-such-tap"}`, 400}, // a TAP device the jail's user cannot attach to
		{"PUT", "/network-interfaces/eth0", `{"iface_id":"eth0","host_dev_name":"lo"}`, 400},               // not a TAP device of the jail's user
		{"PUT", "/vsock", `{"guest_cid":3,"uds_path":"/run/v.sock"}`, 400},                                 // root's directory
		{"PUT", "/vsock", `{"guest_cid":3,"uds_path":"/snapshot/v.sock"}`, 204},
		{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":128,"track_dirty_pages":true}`, 204},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 204},
		{"PATCH", "/vm", `{"state":"Paused"}`, 204},
		{"PUT", "/snapshot/create", `{"snapshot_type":"Full","snapshot_path":"/vmstate","mem_file_path":"/memory"}`, 400},
		{"PUT", "/snapshot/create", `{"snapshot_type":"Full","snapshot_path":"/snapshot/vmstate","mem_file_path":"/snapshot/memory"}`, 204},
	} {
		if status, fault := call(t, srv.URL, s.method, s.path, s.body); status != s.status {
			t.Errorf("%s %s %s: %d %q, want %d", s.method, s.path, s.body, status, fault, s.status)
		}
	}
}
