package main_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/testutil"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/qemu"
	"github.com/kilnhq/kiln/internal/vmrun"
)

type kilnServer struct {
	e    *env
	url  string
	cmd  *exec.Cmd
	logs *serverLog
}

// serverLog is a server's stderr as read so far, safe to read while the server runs.
type serverLog struct {
	mu   sync.Mutex
	b    strings.Builder
	done chan struct{} // closed once stderr is read to its end
}

func (l *serverLog) add(line string) {
	l.mu.Lock()
	l.b.WriteString(line + "\n")
	l.mu.Unlock()
}

func (l *serverLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startServer runs `kiln server` on addr and waits until it serves.
func startServer(t *testing.T, e *env, addr string, extra ...string) *kilnServer {
	t.Helper()
	c := e.cmd(append([]string{"server", "--listen", addr}, extra...)...)
	logs := &serverLog{done: make(chan struct{})}
	stderr, _ := c.StderrPipe()
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan bool, 1)
	go func() {
		defer close(logs.done)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			logs.add(sc.Text())
			if strings.Contains(sc.Text(), "serving the API") {
				ready <- true
			}
		}
		ready <- false
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatalf("server exited:\n%s", logs.String())
		}
	case <-time.After(2 * time.Minute):
		c.Process.Kill()
		t.Fatal("server did not start")
	}
	return &kilnServer{e: e, url: "http://" + addr, cmd: c, logs: logs}
}

// stopOnFailure stops a server a test left running (it failed part-way): a failed run
// leaves machines running by design, and they must not outlive the test.
func stopOnFailure(srv **kilnServer) {
	s := *srv
	if s == nil {
		return
	}
	s.stop(syscall.SIGTERM)
	testutil.KillProcessesNaming(s.e.dataDir)
	os.RemoveAll(filepath.Join(s.e.dataDir, "vms"))
	os.RemoveAll(filepath.Join(s.e.dataDir, "locks"))
}

func (s *kilnServer) stop(sig syscall.Signal) {
	s.cmd.Process.Signal(sig)
	// Its last lines are read before Wait closes the pipe (unless something it started
	// holds stderr open).
	select {
	case <-s.logs.done:
	case <-time.After(10 * time.Second):
	}
	s.cmd.Wait()
}

// kiln runs the CLI against the server.
func (s *kilnServer) kiln(stdin string, args ...string) (string, string, int) {
	return s.e.run(stdin, append([]string{"--api-url", s.url}, args...)...)
}

func TestServerEndToEnd(t *testing.T) {
	e := newEnv(t)
	addr := freeAddr(t)
	srv := startServer(t, e, addr)
	defer stopOnFailure(&srv)
	ctx := context.Background()
	tokenFile := filepath.Join(e.dataDir, "admin-token")

	// Unauthenticated calls get 401.
	resp, err := http.Get(srv.url + "/v1/apps")
	if err != nil || resp.StatusCode != 401 {
		t.Fatalf("unauthenticated: %v %v", resp.StatusCode, err)
	}
	resp.Body.Close()

	// Load an image built here.
	tarball := filepath.Join(e.dataDir, "app.tar")
	imagetest.WriteDockerTarball(t, imagetest.App(t), "localhost/app:1", tarball)
	out, errs, code := srv.kiln("", "image", "load", tarball)
	if code != 0 || !strings.Contains(out, "localhost/app:1") {
		t.Fatalf("image load: %d %s %s", code, out, errs)
	}

	// Run a long-lived machine.
	out, errs, code = srv.kiln("", "machine", "run", "localhost/app:1", "--app", "web", "-e", "MODE=prod", "--",
		"sh", "-c", "echo started in $MODE; echo warn >&2; while true; do sleep 1; done")
	if code != 0 {
		t.Fatalf("machine run: %s", errs)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	id := lines[len(lines)-1]
	// run waits until the machine is started, saying so: an exec right after it works.
	if !strings.Contains(errs, "machine "+id+" started") {
		t.Errorf("machine run's progress: %q", errs)
	}
	if out, errs, code := srv.kiln("", "machine", "exec", id, "--", "sh", "-c", "echo up"); code != 0 || out != "up\n" {
		t.Fatalf("exec right after run: %d %s %s", code, out, errs)
	}
	// --detach returns at once, with the machine still on its way.
	out, errs, code = srv.kiln("", "machine", "run", "localhost/app:1", "--app", "web", "--detach", "--", "sleep", "1000")
	if code != 0 || strings.Contains(errs, "waiting for") {
		t.Errorf("machine run --detach: %d %q", code, errs)
	}
	detached := strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:])
	if _, errs, code := srv.kiln("", "machine", "destroy", detached, "--force"); code != 0 {
		t.Fatalf("destroy the detached machine: %s", errs)
	}
	out, _, _ = srv.kiln("", "machine", "ls", "--app", "web", "--json")
	var ms []api.Machine
	if json.Unmarshal([]byte(out), &ms); len(ms) != 1 || ms[0].ID != id || ms[0].State != "started" || ms[0].Config.Image != "localhost/app:1" {
		t.Errorf("ls --json: %s", out)
	}
	out, _, code = srv.kiln("", "machine", "exec", id, "--", "sh", "-c", "id -u; cat /etc/hostname 2>/dev/null; hostname")
	if code != 0 || !strings.HasPrefix(out, "1234\n") {
		t.Errorf("exec: %d %q", code, out)
	}
	waitFor(t, func() bool {
		out, errs, _ := srv.kiln("", "logs", id)
		return strings.Contains(out, "started in prod") && strings.Contains(errs, "warn")
	}, "logs to show the workload's output")

	// Suspend a machine with state in memory; it is resumed after the server restart below.
	cl0 := client.New(srv.url, readToken(t, tokenFile))
	sus, err := cl0.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
		Init: api.Init{Cmd: []string{"sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /data/count; sleep 0.1; done"}}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl0.Wait(ctx, "web", sus.ID, "started", 60*time.Second); err != nil {
		t.Fatal(err)
	}
	before, err := cl0.Exec(ctx, "web", sus.ID, []string{"sh", "-c", "cat /proc/sys/kernel/random/boot_id; cat /data/count"}, "", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, errs, code := srv.kiln("", "machine", "suspend", sus.ID); code != 0 {
		t.Fatalf("suspend: %s", errs)
	}
	if err := cl0.Wait(ctx, "web", sus.ID, "suspended", 60*time.Second); err != nil {
		t.Fatalf("wait suspended: %v\n%s", err, srv.logs)
	}

	// kill -9 of the server: the machine keeps running and is adopted on restart.
	srv.stop(syscall.SIGKILL)
	// Meanwhile a VM appears that no machine owns: the restart must remove it and say so.
	ghostRT := &vmrun.Runtime{DataDir: e.dataDir, Driver: &qemu.Driver{}, Assets: testutil.Assets(t), Accel: vmm.AccelTCG}
	ghost, err := ghostRT.Boot(ctx, vmrun.Spec{CPUs: 1, MemoryMiB: 256, Owner: "no-such-machine"})
	if err != nil {
		t.Fatal(err)
	}
	ghost.Release()
	srv = startServer(t, e, addr)
	if !strings.Contains(srv.logs.String(), "re-adopted") {
		t.Errorf("restart did not say it adopted the VM:\n%s", srv.logs)
	}
	if !strings.Contains(srv.logs.String(), "destroyed VM "+ghost.ID) {
		t.Errorf("restart did not report removing the unowned VM %s:\n%s", ghost.ID, srv.logs)
	}
	cl := client.New(srv.url, readToken(t, tokenFile))
	m, err := cl.GetMachine(ctx, "web", id)
	if err != nil || m.State != "started" {
		t.Fatalf("after server restart: %+v %v", m, err)
	}
	if res, err := cl.Exec(ctx, "web", id, []string{"sh", "-c", "echo still here"}, "", 30*time.Second); err != nil || res.Stdout != "still here\n" {
		t.Errorf("exec after restart: %+v %v", res, err)
	}

	// The suspended machine resumes where it was: same boot, its process still counting.
	if _, errs, code := srv.kiln("", "machine", "start", sus.ID); code != 0 {
		t.Fatalf("start suspended: %s", errs)
	}
	if err := cl.Wait(ctx, "web", sus.ID, "started", 60*time.Second); err != nil {
		t.Fatalf("wait resumed: %v\n%s", err, srv.logs)
	}
	after, err := cl.Exec(ctx, "web", sus.ID, []string{"sh", "-c", "cat /proc/sys/kernel/random/boot_id; cat /data/count"}, "", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	bootBefore, countBefore, _ := strings.Cut(before.Stdout, "\n")
	bootAfter, countAfter, _ := strings.Cut(after.Stdout, "\n")
	var nb, na int
	fmt.Sscan(countBefore, &nb)
	fmt.Sscan(countAfter, &na)
	if bootBefore != bootAfter || na <= nb {
		t.Errorf("resume: boot %s→%s, count %d→%d; want the same boot and a count that went on", bootBefore, bootAfter, nb, na)
	}
	if evs, _ := cl.Events(ctx, "web", sus.ID); !hasEvent(evs, "suspend") || !hasEvent(evs, "resume") || hasEvent(evs, "resume-failed-cold-boot") {
		t.Errorf("events: %+v", evs)
	}
	if _, errs, code := srv.kiln("", "machine", "destroy", sus.ID, "--force"); code != 0 {
		t.Fatalf("destroy resumed: %s", errs)
	}

	// Stop and start again.
	if _, errs, code := srv.kiln("", "machine", "stop", id); code != 0 {
		t.Fatalf("stop: %s", errs)
	}
	if err := cl.Wait(ctx, "web", id, "stopped", 60*time.Second); err != nil {
		t.Fatalf("wait stopped: %v\n%s", err, srv.logs)
	}
	if _, errs, code := srv.kiln("", "machine", "start", id); code != 0 {
		t.Fatalf("start: %s", errs)
	}
	if err := cl.Wait(ctx, "web", id, "started", 60*time.Second); err != nil {
		t.Fatalf("wait started again: %v", err)
	}

	// Metadata, cordon, leases, signals and config updates.
	call := func(method, path, body, nonce string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, srv.url+"/v1/apps/web/machines/"+id+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+readToken(t, tokenFile))
		if nonce != "" {
			req.Header.Set(api.LeaseHeader, nonce)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		return resp.StatusCode, b.String()
	}
	if code, body := call("POST", "/metadata/role", `{"value":"web"}`, ""); code != 204 {
		t.Errorf("set metadata: %d %s", code, body)
	}
	if _, body := call("GET", "/metadata", "", ""); !strings.Contains(body, `"role":"web"`) {
		t.Errorf("metadata: %s", body)
	}
	call("POST", "/cordon", "", "")
	if m, _ := cl.GetMachine(ctx, "web", id); !m.Cordoned {
		t.Error("cordon did not stick")
	}
	call("POST", "/uncordon", "", "")
	code, body := call("POST", "/lease", `{"ttl":60,"description":"deploy"}`, "")
	var held api.LeaseResponse
	json.Unmarshal([]byte(body), &held)
	if code != 201 || held.Data == nil || held.Data.Nonce == "" || held.Data.Description != "deploy" {
		t.Fatalf("lease: %d %s", code, body)
	}
	lease := held.Data
	if code, body := call("POST", "/lease", `{"ttl":60}`, ""); code != 409 {
		t.Errorf("second lease: %d %s", code, body)
	}
	if code, body := call("POST", "/cordon", "", ""); code != 409 || !strings.Contains(body, api.LeaseHeader) {
		t.Errorf("change without the nonce under a lease: %d %s", code, body)
	}
	if code, body := call("POST", "/uncordon", "", lease.Nonce); code != 200 {
		t.Errorf("change with the nonce: %d %s", code, body)
	}
	if code, _ := call("DELETE", "/lease", "", lease.Nonce); code != 200 {
		t.Error("release lease")
	}
	code, body = call("POST", "", `{"config":{"image":"localhost/app:1","env":{"MODE":"canary"},"init":{"cmd":["sh","-c","echo mode $MODE; while true; do sleep 1; done"]}}}`, "")
	var updated api.Machine
	json.Unmarshal([]byte(body), &updated)
	if code != 200 || updated.Version != "2" {
		t.Fatalf("update: %d %s", code, body)
	}
	if err := cl.Wait(ctx, "web", id, "started", 60*time.Second); err != nil {
		t.Fatal(err)
	}
	if res, err := cl.Exec(ctx, "web", id, []string{"sh", "-c", "echo $MODE"}, "", 30*time.Second); err != nil || res.Stdout != "canary\n" {
		t.Errorf("after update: %+v %v", res, err)
	}
	trap, err := cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
		Init: api.Init{Cmd: []string{"sh", "-c", "trap 'echo got term; exit 5' TERM; echo armed; while true; do sleep 0.2; done"}}}})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { out, _, _ := srv.kiln("", "logs", trap.ID); return strings.Contains(out, "armed") }, "the trap to be armed")
	req, _ := http.NewRequest("POST", srv.url+"/v1/apps/web/machines/"+trap.ID+"/signal", strings.NewReader(`{"signal":"SIGTERM"}`))
	req.Header.Set("Authorization", "Bearer "+readToken(t, tokenFile))
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("signal: %v %v", resp.StatusCode, err)
	}
	if err := cl.Wait(ctx, "web", trap.ID, "stopped", 60*time.Second); err != nil {
		t.Fatal(err)
	}
	if m, _ := cl.GetMachine(ctx, "web", trap.ID); m.ExitCode == nil || *m.ExitCode != 5 {
		t.Errorf("exit after SIGTERM: %+v", m.ExitCode)
	}
	// Stop with a signal and a timeout: the workload hears the signal before the VM goes.
	if err := cl.Start(ctx, "web", trap.ID); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { out, _, _ := srv.kiln("", "logs", trap.ID); return strings.Count(out, "armed") == 2 }, "the trap to be armed again")
	req, _ = http.NewRequest("POST", srv.url+"/v1/apps/web/machines/"+trap.ID+"/stop", strings.NewReader(`{"signal":"SIGTERM","timeout":"10s"}`))
	req.Header.Set("Authorization", "Bearer "+readToken(t, tokenFile))
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("stop with signal: %v %v", resp.StatusCode, err)
	}
	if err := cl.Wait(ctx, "web", trap.ID, "stopped", 60*time.Second); err != nil {
		t.Fatal(err)
	}
	if out, _, _ := srv.kiln("", "logs", trap.ID); strings.Count(out, "got term") != 2 {
		t.Errorf("the stop signal did not reach the workload:\n%s", out)
	}
	if _, errs, code := srv.kiln("", "machine", "destroy", trap.ID); code != 0 {
		t.Errorf("destroy stopped machine: %s", errs)
	}

	// auto_destroy: a machine whose workload exits is destroyed.
	once, err := cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
		Init: api.Init{Cmd: []string{"sh", "-c", "echo done"}}, AutoDestroy: true}})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Wait(ctx, "web", once.ID, "destroyed", 60*time.Second); err != nil {
		t.Errorf("auto_destroy: %v", err)
	}

	// on-failure restarts a crashing workload max_retries times, then leaves it stopped.
	crash, err := cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{
		Image: "localhost/app:1", Init: api.Init{Cmd: []string{"sh", "-c", "echo boom; exit 3"}},
		Restart: api.Restart{Policy: "on-failure", MaxRetries: 2}}})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		evs, _ := cl.Events(ctx, "web", crash.ID)
		restarts, exits := 0, 0
		for _, ev := range evs {
			if ev.Type == "restart" {
				restarts++
			}
			if ev.Type == "exit" && ev.Request != nil && ev.Request.ExitEvent != nil && ev.Request.ExitEvent.ExitCode == 3 {
				exits++
			}
		}
		m, _ := cl.GetMachine(ctx, "web", crash.ID)
		return restarts == 2 && exits == 3 && m.State == "stopped"
	}, "two restarts after three exits with code 3")

	// Bad input: a 4xx naming the problem, and nothing half-created.
	for _, tc := range []struct {
		body string
		code int
		want string
	}{
		{`{"config":{"image":"localhost/nope:1"}}`, 404, "kiln image load"},
		{`{"config":{"imag":"localhost/app:1"}}`, 400, `unknown field "imag"`},
		{`{"config":{"image":"localhost/app:1","guest":{"memory_mb":99999999}}}`, 400, "memory_mb"},
		{`{"config":{"image":"localhost/app:1","restart":{"policy":"sometimes"}}}`, 400, "restart.policy"},
		{`{not json`, 400, "request body"},
	} {
		req, _ := http.NewRequest("POST", srv.url+"/v1/apps/web/machines", strings.NewReader(tc.body))
		req.Header.Set("Authorization", "Bearer "+readToken(t, tokenFile))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var ae api.Error
		json.NewDecoder(resp.Body).Decode(&ae)
		resp.Body.Close()
		if resp.StatusCode != tc.code || !strings.Contains(ae.Error, tc.want) {
			t.Errorf("%s: %d %q, want %d with %q", tc.body, resp.StatusCode, ae.Error, tc.code, tc.want)
		}
	}
	if _, err := cl.ListMachines(ctx, "nope"); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Errorf("unknown app: %v", err)
	}
	if ms, _ := cl.ListMachines(ctx, "web"); len(ms) != 2 {
		t.Errorf("a refused create left a record: %d machines", len(ms))
	}
	if _, errs, code := srv.kiln("", "machine", "destroy", id); code == 0 || !strings.Contains(errs, "force") {
		t.Errorf("destroying a running machine without force: %d %s", code, errs)
	}

	// A volume keeps its data across machines and attaches to one at a time.
	if _, errs, code := srv.kiln("", "volume", "create", "data", "--app", "web", "--size", "1G"); code != 0 {
		t.Fatalf("volume create: %s", errs)
	}
	out, errs, code = srv.kiln("", "machine", "run", "localhost/app:1", "--app", "web", "--volume", "data:/data", "--",
		"sh", "-c", "echo persisted > /data/note; while true; do sleep 1; done")
	if code != 0 {
		t.Fatalf("machine with volume: %s", errs)
	}
	withVol := strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:])
	if err := cl.Wait(ctx, "web", withVol, "started", 60*time.Second); err != nil {
		t.Fatal(err)
	}
	_, err = cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1", Mounts: []api.Mount{{Volume: "data", Path: "/data"}}}})
	if err == nil || !strings.Contains(err.Error(), withVol) || !strings.Contains(err.Error(), "one machine at a time") {
		t.Errorf("second attach: %v", err)
	}
	var ce *client.Error
	if !errors.As(err, &ce) || ce.Status != 409 {
		t.Errorf("second attach status: %v", err)
	}
	waitFor(t, func() bool {
		res, err := cl.Exec(ctx, "web", withVol, []string{"sh", "-c", "cat /data/note"}, "", 10*time.Second)
		return err == nil && res.Stdout == "persisted\n"
	}, "the machine to write to its volume")
	ext, err := cl.ExtendVolume(ctx, "web", "data", 2)
	if err != nil || !ext.NeedsRestart || ext.Volume.SizeGB != 2 {
		t.Errorf("extend while attached: %+v %v", ext, err)
	}
	if _, errs, code := srv.kiln("", "machine", "destroy", withVol, "--force"); code != 0 {
		t.Fatalf("destroy: %s", errs)
	}
	reader, err := cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
		Init:   api.Init{Cmd: []string{"sh", "-c", "cat /data/note; df -k /data | tail -1; while true; do sleep 1; done"}},
		Mounts: []api.Mount{{Volume: "data", Path: "/data"}}}})
	if err != nil {
		t.Fatalf("re-attach after destroy: %v", err)
	}
	waitFor(t, func() bool {
		out, _, _ := srv.kiln("", "logs", reader.ID)
		// Both lines: the data, then df's line for /data (the output may come in pieces).
		return strings.Contains(out, "persisted") && strings.Contains(out, "/data")
	}, "the volume's data in a new machine")
	out, _, _ = srv.kiln("", "logs", reader.ID)
	if !strings.Contains(out, " 20") { // df shows about 2 GiB (20xxxxx KiB) after the extend
		t.Errorf("volume not grown to 2G in the new machine: %s", out)
	}
	if err := cl.DeleteVolume(ctx, "web", "data"); err == nil {
		t.Error("deleted a volume a machine holds")
	}
	// A snapshot of the volume in use restores into a new volume with the data.
	out, errs, code = srv.kiln("", "volume", "snapshot", "data", "--app", "web")
	if code != 0 {
		t.Fatalf("snapshot: %s", errs)
	}
	snapID := strings.TrimSpace(out)
	if sns, err := cl.Snapshots(ctx, "web", "data"); err != nil || len(sns) != 1 || sns[0].ID != snapID {
		t.Errorf("snapshots: %+v %v", sns, err)
	}
	if _, errs, code := srv.kiln("", "volume", "create", "copy", "--app", "web", "--size", "2G", "--snapshot", snapID); code != 0 {
		t.Fatalf("restore: %s", errs)
	}
	copyReader, err := cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
		Init: api.Init{Cmd: []string{"sh", "-c", "cat /copy/note; while true; do sleep 1; done"}}, Mounts: []api.Mount{{Volume: "copy", Path: "/copy"}}}})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		out, _, _ := srv.kiln("", "logs", copyReader.ID)
		return strings.Contains(out, "persisted")
	}, "the snapshot's data in the restored volume")
	if _, errs, code := srv.kiln("", "machine", "destroy", copyReader.ID, "--force"); code != 0 {
		t.Fatalf("destroy: %s", errs)
	}
	if _, errs, code := srv.kiln("", "volume", "destroy", "copy", "--app", "web"); code != 0 {
		t.Errorf("destroy copy: %s", errs)
	}
	if _, errs, code := srv.kiln("", "machine", "destroy", reader.ID, "--force"); code != 0 {
		t.Fatalf("destroy reader: %s", errs)
	}
	if _, errs, code := srv.kiln("", "volume", "destroy", "data", "--app", "web"); code != 0 {
		t.Errorf("volume destroy: %s", errs)
	}

	// Destroy everything; then nothing of it remains on the host.
	for _, mid := range []string{id, crash.ID} {
		if _, errs, code := srv.kiln("", "machine", "destroy", mid, "--force"); code != 0 {
			t.Errorf("destroy %s: %s", mid, errs)
		}
	}
	if ms, _ := cl.ListMachines(ctx, "web"); len(ms) != 0 {
		t.Errorf("destroyed machines still listed: %+v", ms)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}

func hasEvent(evs []api.Event, typ string) bool {
	for _, e := range evs {
		if e.Type == typ {
			return true
		}
	}
	return false
}

func readToken(t *testing.T, path string) string {
	t.Helper()
	out, err := exec.Command("cat", path).Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
