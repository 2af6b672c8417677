// Package flaps_test is kiln's definition of "compatible with Fly Machines clients": Fly's
// own Go client (the flaps package of github.com/superfly/fly-go, pinned in go.mod)
// drives a real `kiln server` with real VMs through every method for apps, machines,
// leases, metadata, volumes and volume snapshots. A change that breaks Fly's client
// fails here. The few things Fly's API has that this client never sends (FlyV1
// authorization, list filters, event limits, bulk metadata, waiting for several states)
// are sent as Fly documents them, over plain HTTP.
package flaps_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	fly "github.com/superfly/fly-go"
	"github.com/superfly/fly-go/flaps"
	"github.com/superfly/fly-go/tokens"

	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/testutil"
	"github.com/kilnhq/kiln/internal/vmm"
)

func TestMain(m *testing.M) {
	// The server's machines get no network here, but its VMs and any rule it makes stay
	// in a network namespace of the test's own all the same.
	if code, ran := testutil.InNetNS(); ran {
		os.Exit(code)
	}
	os.Exit(testutil.Finish(m.Run()))
}

// kiln is a running `kiln server` and what a client needs to reach it.
type kiln struct {
	t       *testing.T
	bin     string
	dataDir string
	url     string
	token   string
	logs    *bytes.Buffer
}

func startKiln(t *testing.T) *kiln {
	t.Helper()
	testutil.RequireQEMU(t)
	testutil.Assets(t)
	binDir := t.TempDir()
	bin := testutil.GoBuild(t, "./cmd/kiln", binDir)
	testutil.GoBuild(t, "./cmd/kiln-init", binDir)
	k := &kiln{t: t, bin: bin, dataDir: testutil.TempDir(t), logs: &bytes.Buffer{}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	// The host offers machines 1.5 GiB, so a launch of 2 GiB can never fit.
	reserve := vmm.HostMemoryMiB() - 1536
	srv := k.cmd("server", "--listen", addr, "--proxy-listen", "off", "--network=false",
		"--memory-overcommit", "1", "--reserve-memory", strconv.Itoa(reserve))
	stderr, _ := srv.StderrPipe()
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			k.logs.WriteString(sc.Text() + "\n")
			if strings.Contains(sc.Text(), "serving the API") {
				ready <- true
			}
		}
		ready <- false
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatalf("kiln server exited:\n%s", k.logs)
		}
	case <-time.After(2 * time.Minute):
		srv.Process.Kill()
		t.Fatal("kiln server did not start in 2 minutes")
	}
	t.Cleanup(func() {
		srv.Process.Signal(syscall.SIGTERM)
		srv.Wait()
		if t.Failed() {
			t.Logf("server log:\n%s", k.logs)
			testutil.KillProcessesNaming(k.dataDir)
			return
		}
		testutil.RequireNothingLeft(t, k.dataDir)
	})
	k.url = "http://" + addr
	tok, err := os.ReadFile(filepath.Join(k.dataDir, "admin-token"))
	if err != nil {
		t.Fatal(err)
	}
	k.token = strings.TrimSpace(string(tok))
	return k
}

func (k *kiln) cmd(args ...string) *exec.Cmd {
	c := exec.Command(k.bin, args...)
	c.Env = append(os.Environ(), "KILN_DATA_DIR="+k.dataDir, "KILN_ASSETS_DIR="+filepath.Join(testutil.DataDir(), "assets"))
	return c
}

// loadImage puts a test image into kiln's registry: Fly's API has no upload, kiln's
// CLI has.
func (k *kiln) loadImage(ref string) {
	k.t.Helper()
	tarball := filepath.Join(k.t.TempDir(), "image.tar")
	imagetest.WriteDockerTarball(k.t, imagetest.App(k.t), ref, tarball)
	if out, err := k.cmd("--api-url", k.url, "image", "load", tarball).CombinedOutput(); err != nil {
		k.t.Fatalf("kiln image load: %v\n%s", err, out)
	}
}

// flapsClient is Fly's client as flyctl makes it, pointed at kiln by
// FLY_FLAPS_BASE_URL.
func (k *kiln) flapsClient(ctx context.Context) *flaps.Client {
	k.t.Helper()
	k.t.Setenv("FLY_FLAPS_BASE_URL", k.url)
	c, err := flaps.NewWithOptions(ctx, flaps.NewClientOpts{Tokens: tokens.Parse(k.token), UserAgent: "kiln-compat-test"})
	if err != nil {
		k.t.Fatal(err)
	}
	return c
}

// do sends a request as Fly documents it, for what flaps never sends.
func (k *kiln) do(method, path, auth string, body any, out any) int {
	k.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, k.url+path, rd)
	if auth == "" {
		auth = "Bearer " + k.token
	}
	req.Header.Set("Authorization", auth)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		k.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if out != nil && resp.StatusCode < 300 {
		if err := json.Unmarshal(raw, out); err != nil {
			k.t.Fatalf("%s %s: decoding %s: %v", method, path, raw, err)
		}
	}
	if resp.StatusCode >= 300 {
		k.t.Logf("%s %s: %d %s", method, path, resp.StatusCode, raw)
	}
	return resp.StatusCode
}

const image = "localhost/app:1"

// loop runs until stopped.
var loop = []string{"sh", "-c", "while true; do sleep 1; done"}

// bootID changes at every boot of a guest, not at a resume.
const bootID = "busybox cat /proc/sys/kernel/random/boot_id"

// must(f())(t, "what") is f's value, or the test's end with what failed.
func must[T any](v T, err error) func(*testing.T, string) T {
	return func(t *testing.T, what string) T {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		return v
	}
}

func ok(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// statusOf is the HTTP status and Fly status word of a flaps error.
func statusOf(err error) (int, string) {
	var fe *flaps.FlapsError
	if !errors.As(err, &fe) {
		return 0, ""
	}
	word := ""
	if sc := fe.StatusCode(); sc != nil {
		word = string(*sc)
	}
	return fe.ResponseStatusCode, word
}

func execOut(t *testing.T, ctx context.Context, c *flaps.Client, app, id, cmd string) string {
	t.Helper()
	res := must(c.Exec(ctx, app, id, &fly.MachineExecRequest{Cmd: cmd, Timeout: 30}))(t, "exec "+cmd)
	if res.ExitCode != 0 {
		t.Fatalf("exec %q: exit %d, stderr %q", cmd, res.ExitCode, res.StdErr)
	}
	return res.StdOut
}

// flyFile is a config.files raw_value: base64 of "from a file\n".
var flyFile = "ZnJvbSBhIGZpbGUK"

func TestFlyClient(t *testing.T) {
	k := startKiln(t)
	k.loadImage(image)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	c := k.flapsClient(ctx)
	const app = "fly-compat"

	// Apps, as flyctl makes them: with an org slug kiln has no use for.
	created := must(c.CreateApp(ctx, flaps.CreateAppRequest{Name: app, Org: "personal"}))(t, "CreateApp")
	if created == nil || created.Name != app {
		t.Fatalf("CreateApp answered %+v", created)
	}
	ok(t, "WaitForApp", c.WaitForApp(ctx, app))
	got := must(c.GetApp(ctx, app))(t, "GetApp")
	if got.Name != app || got.Organization.Slug == "" {
		t.Errorf("GetApp: %+v", got)
	}
	apps := must(c.ListApps(ctx, flaps.ListAppsRequest{OrgSlug: "personal"}))(t, "ListApps")
	if !slices.ContainsFunc(apps, func(a flaps.App) bool { return a.Name == app }) {
		t.Errorf("ListApps does not list %s: %+v", app, apps)
	}
	if free, err := c.AppNameAvailable(ctx, "no-such-app"); err != nil || !free {
		t.Errorf("AppNameAvailable(no-such-app) = %v, %v; want true", free, err)
	}

	// Launch, wait, get, list.
	launch := fly.LaunchMachineInput{Name: "web", Region: "ams", SkipSecrets: true, Config: &fly.MachineConfig{
		Image:    image,
		Env:      map[string]string{"GREETING": "hello"},
		Init:     fly.MachineInit{Cmd: loop},
		Guest:    &fly.MachineGuest{CPUKind: "shared", CPUs: 1, MemoryMB: 256},
		Metadata: map[string]string{"role": "web"},
		Restart:  &fly.MachineRestart{Policy: fly.MachineRestartPolicyNo},
		DNS:      &fly.DNSConfig{SkipRegistration: true},
		Files:    []*fly.File{{GuestPath: "/etc/fly/greeting.txt", RawValue: &flyFile, Mode: 0o644}},
	}}
	m := must(c.Launch(ctx, app, launch))(t, "Launch")
	if m.ID == "" || m.Version == "" || m.InstanceID == "" || m.Config == nil || m.Config.Image != image {
		t.Fatalf("Launch answered %+v", m)
	}
	ok(t, "Wait started", c.Wait(ctx, app, m, "started", 60*time.Second))
	m = must(c.Get(ctx, app, m.ID))(t, "Get")
	if m.State != fly.MachineStateStarted || m.Config.Env["GREETING"] != "hello" || m.Name != "web" {
		t.Errorf("Get: state %s, config %+v", m.State, m.Config)
	}
	if len(m.Events) == 0 || m.Events[0].Type == "" || m.Events[0].Status == "" || m.Events[0].Source == "" || m.Events[0].Timestamp == 0 {
		t.Errorf("Get: events without Fly's fields: %+v", m.Events)
	}
	many := must(c.GetMany(ctx, app, []string{m.ID}))(t, "GetMany")
	if len(many) != 1 || many[0].ID != m.ID {
		t.Errorf("GetMany: %+v", many)
	}
	if all := must(c.List(ctx, app, ""))(t, "List"); len(all) != 1 {
		t.Errorf("List: %d machines, want 1", len(all))
	}
	if active := must(c.ListActive(ctx, app))(t, "ListActive"); len(active) != 1 {
		t.Errorf("ListActive: %d machines, want 1", len(active))
	}
	if out := execOut(t, ctx, c, app, m.ID, `sh -c 'echo "$GREETING, fly"'`); out != "hello, fly\n" {
		t.Errorf("exec: stdout %q", out)
	}
	// config.files, as fly-go sends them: written before the workload starts.
	if out := execOut(t, ctx, c, app, m.ID, `sh -c 'cat /etc/fly/greeting.txt'`); out != "from a file\n" {
		t.Errorf("config.files: the file holds %q", out)
	}
	ps := must(c.GetProcesses(ctx, app, m.ID))(t, "GetProcesses")
	if !slices.ContainsFunc(ps, func(p fly.ProcessStat) bool {
		return strings.Contains(p.Command, "sleep") || strings.Contains(p.Command, "sh -c")
	}) {
		t.Errorf("GetProcesses does not show the workload: %+v", ps)
	}

	// Metadata.
	ok(t, "SetMetadata", c.SetMetadata(ctx, app, m.ID, "tier", "gold"))
	md := must(c.GetMetadata(ctx, app, m.ID))(t, "GetMetadata")
	if md["tier"] != "gold" || md["role"] != "web" {
		t.Errorf("GetMetadata: %v", md)
	}
	ok(t, "DeleteMetadata", c.DeleteMetadata(ctx, app, m.ID, "tier"))
	if md := must(c.GetMetadata(ctx, app, m.ID))(t, "GetMetadata"); md["tier"] != "" {
		t.Errorf("metadata after delete: %v", md)
	}

	// Leases: one holder changes the machine; everyone else is refused.
	ttl := 30
	lease := must(c.AcquireLease(ctx, app, m.ID, &ttl))(t, "AcquireLease")
	if lease.Status != "success" || lease.Data == nil || lease.Data.Nonce == "" || lease.Data.ExpiresAt == 0 {
		t.Fatalf("AcquireLease answered %+v", lease)
	}
	nonce := lease.Data.Nonce
	// Fly's client retries a held lease for up to a minute: a second client given two
	// seconds gets none, and each of its tries was refused with 409.
	other := k.flapsClient(ctx)
	short, cancelShort := context.WithTimeout(ctx, 2*time.Second)
	if _, err := other.AcquireLease(short, app, m.ID, &ttl); err == nil {
		t.Error("a second client took a held lease")
	}
	cancelShort()
	if code := k.do("POST", "/v1/apps/"+app+"/machines/"+m.ID+"/lease", "", map[string]int{"ttl": 30}, nil); code != http.StatusConflict {
		t.Errorf("a second lease while one is held: %d, want 409", code)
	}
	if err := other.Stop(ctx, app, fly.StopMachineInput{ID: m.ID}, ""); err == nil {
		t.Error("a stop without the lease's nonce was let through")
	} else if code, _ := statusOf(err); code != http.StatusConflict {
		t.Errorf("a stop without the lease's nonce: %v (status %d), want 409", err, code)
	}
	found := must(c.FindLease(ctx, app, m.ID))(t, "FindLease")
	if found.Data == nil || found.Data.Nonce != nonce {
		t.Errorf("FindLease: %+v", found)
	}
	longer := 60
	refreshed := must(c.RefreshLease(ctx, app, m.ID, &longer, nonce))(t, "RefreshLease")
	if refreshed.Data == nil || refreshed.Data.Nonce != nonce || refreshed.Data.ExpiresAt <= lease.Data.ExpiresAt {
		t.Errorf("RefreshLease: %+v after %+v", refreshed.Data, lease.Data)
	}

	// Update: the workload sees the new env.
	update := launch
	cfg := *m.Config
	cfg.Env = map[string]string{"GREETING": "updated"}
	update.Config, update.ID = &cfg, m.ID
	updated := must(c.Update(ctx, app, update, nonce))(t, "Update")
	if updated.Version == m.Version {
		t.Errorf("Update kept version %s", m.Version)
	}
	ok(t, "Wait after update", c.Wait(ctx, app, updated, "started", 60*time.Second))
	if out := execOut(t, ctx, c, app, m.ID, `sh -c 'echo $GREETING'`); out != "updated\n" {
		t.Errorf("after update the workload sees GREETING=%q", out)
	}

	// Restart, cordon.
	ok(t, "Restart", c.Restart(ctx, app, fly.RestartMachineInput{ID: m.ID, Signal: "SIGTERM", Timeout: 5 * time.Second}, nonce))
	ok(t, "Wait after restart", c.Wait(ctx, app, updated, "started", 60*time.Second))
	ok(t, "Cordon", c.Cordon(ctx, app, m.ID, nonce))
	ok(t, "Uncordon", c.Uncordon(ctx, app, m.ID, nonce))

	// Suspend, then start: the VM resumes where it was, it does not boot again.
	before := execOut(t, ctx, c, app, m.ID, bootID)
	ok(t, "Suspend", c.Suspend(ctx, app, m.ID, nonce))
	ok(t, "Wait suspended", c.Wait(ctx, app, updated, "suspended", 60*time.Second))
	start := must(c.Start(ctx, app, m.ID, nonce))(t, "Start")
	if start.PreviousState != "suspended" {
		t.Errorf("Start after suspend: previous_state %q", start.PreviousState)
	}
	ok(t, "Wait resumed", c.Wait(ctx, app, updated, "started", 60*time.Second))
	if after := execOut(t, ctx, c, app, m.ID, bootID); after != before {
		t.Errorf("resume booted again: boot id %q, was %q", after, before)
	}

	// Stop, then destroy; the lease goes with it.
	ok(t, "Stop", c.Stop(ctx, app, fly.StopMachineInput{ID: m.ID, Signal: "SIGTERM", Timeout: fly.Duration{Duration: 5 * time.Second}}, nonce))
	ok(t, "Wait stopped", c.Wait(ctx, app, updated, "stopped", 60*time.Second))
	ok(t, "ReleaseLease", c.ReleaseLease(ctx, app, m.ID, nonce))
	if st := must(c.List(ctx, app, "state=stopped"))(t, "List stopped"); len(st) != 1 {
		t.Errorf("List state=stopped: %d machines, want 1", len(st))
	}
	ok(t, "Destroy", c.Destroy(ctx, app, fly.RemoveMachineInput{ID: m.ID, Kill: true}, ""))
	ok(t, "Wait destroyed", c.Wait(ctx, app, updated, "destroyed", 30*time.Second))
	if _, err := c.Get(ctx, app, "no-such-machine"); !errors.Is(err, flaps.FlapsErrorNotFound) {
		t.Errorf("Get of a missing machine: %v, want a 404", err)
	}

	// skip_launch records the machine without starting it; lease_ttl hands back a held
	// lease with the new machine.
	// skip_service_registration keeps the proxy from sending it anything (cordoned)
	// until it is uncordoned, as Fly's blue-green deploys do once checks pass.
	idle := must(c.Launch(ctx, app, fly.LaunchMachineInput{SkipLaunch: true, LeaseTTL: 30, SkipServiceRegistration: true,
		Config: &fly.MachineConfig{Image: image, Init: fly.MachineInit{Cmd: loop}}}))(t, "Launch skip_launch")
	if idle.State != fly.MachineStateCreated || idle.LeaseNonce == "" {
		t.Errorf("skip_launch with lease_ttl: state %q, nonce %q", idle.State, idle.LeaseNonce)
	}
	var shown struct {
		Cordoned bool `json:"cordoned"`
	}
	if k.do("GET", "/v1/apps/"+app+"/machines/"+idle.ID, "", nil, &shown); !shown.Cordoned {
		t.Error("a machine launched with skip_service_registration is not cordoned")
	}
	if err := c.Destroy(ctx, app, fly.RemoveMachineInput{ID: idle.ID}, ""); err == nil {
		t.Error("destroy without the nonce of the lease taken at launch was let through")
	} else if code, _ := statusOf(err); code != http.StatusConflict {
		t.Errorf("destroy without the nonce: %v (status %d), want 409", err, code)
	}
	// An update starts a machine that was not running, as on Fly, on its new config.
	relaunch := fly.LaunchMachineInput{ID: idle.ID, Config: &fly.MachineConfig{Image: image, Init: fly.MachineInit{Cmd: loop},
		Env: map[string]string{"STAGE": "two"}}}
	relaunched := must(c.Update(ctx, app, relaunch, idle.LeaseNonce))(t, "Update a created machine")
	ok(t, "Wait after updating a created machine", c.Wait(ctx, app, relaunched, "started", 60*time.Second))
	if out := execOut(t, ctx, c, app, idle.ID, `sh -c 'echo $STAGE'`); out != "two\n" {
		t.Errorf("after updating a created machine: STAGE=%q", out)
	}
	ok(t, "Destroy", c.Destroy(ctx, app, fly.RemoveMachineInput{ID: idle.ID, Kill: true}, idle.LeaseNonce))

	// Capacity: a machine no host can hold is refused with Fly's status word.
	_, err := c.Launch(ctx, app, fly.LaunchMachineInput{Config: &fly.MachineConfig{Image: image, Guest: &fly.MachineGuest{CPUs: 1, MemoryMB: 2048}}})
	if code, word := statusOf(err); word != "insufficient_capacity" {
		t.Errorf("an oversized launch: %v (status %d, word %q), want insufficient_capacity", err, code, word)
	}

	t.Run("volumes", func(t *testing.T) { volumes(t, ctx, c, app) })
	t.Run("beyond flaps", func(t *testing.T) { beyondFlaps(t, k, ctx, c, app) })

	ok(t, "DeleteApp", c.DeleteApp(ctx, app))
	if _, err := c.GetApp(ctx, app); !errors.Is(err, flaps.FlapsErrorNotFound) {
		t.Errorf("GetApp after DeleteApp: %v, want a 404", err)
	}
}

// volumes: create, list, extend, snapshot, fork (the fork has the source's bytes),
// update, delete.
func volumes(t *testing.T, ctx context.Context, c *flaps.Client, app string) {
	one, three := 1, 3
	v := must(c.CreateVolume(ctx, app, fly.CreateVolumeRequest{Name: "data", Region: "ams", SizeGb: &one}))(t, "CreateVolume")
	if v.ID == "" || v.Name != "data" || v.SizeGb != 1 || v.State == "" {
		t.Fatalf("CreateVolume answered %+v", v)
	}
	writer := must(c.Launch(ctx, app, fly.LaunchMachineInput{Config: &fly.MachineConfig{Image: image,
		Init:   fly.MachineInit{Cmd: []string{"sh", "-c", "echo kept > /data/file; sync; while true; do sleep 1; done"}},
		Mounts: []fly.MachineMount{{Volume: v.ID, Path: "/data"}}}}))(t, "Launch with volume")
	ok(t, "Wait writer", c.Wait(ctx, app, writer, "started", 60*time.Second))
	if vs := must(c.GetVolumes(ctx, app))(t, "GetVolumes"); len(vs) != 1 || vs[0].ID != v.ID || vs[0].AttachedMachine == nil || *vs[0].AttachedMachine != writer.ID {
		t.Errorf("GetVolumes: %+v", vs)
	}
	// The workload writes the file once it runs, which may be just after started.
	if out := execOut(t, ctx, c, app, writer.ID, "sh -c 'until [ -s /data/file ]; do sleep 0.1; done; busybox cat /data/file'"); out != "kept\n" {
		t.Fatalf("the writer's file: %q", out)
	}
	ok(t, "Stop writer", c.Stop(ctx, app, fly.StopMachineInput{ID: writer.ID}, ""))
	ok(t, "Wait writer stopped", c.Wait(ctx, app, writer, "stopped", 60*time.Second))

	ext, restart, err := c.ExtendVolume(ctx, app, v.ID, 2)
	ok(t, "ExtendVolume", err)
	if ext.SizeGb != 2 || restart {
		t.Errorf("ExtendVolume: size %d, needs restart %v", ext.SizeGb, restart)
	}
	ok(t, "CreateVolumeSnapshot", c.CreateVolumeSnapshot(ctx, app, v.ID))
	snaps := must(c.GetVolumeSnapshots(ctx, app, v.ID))(t, "GetVolumeSnapshots")
	if len(snaps) != 1 || snaps[0].ID == "" || snaps[0].Size <= 0 {
		t.Errorf("GetVolumeSnapshots: %+v", snaps)
	}
	upd := must(c.UpdateVolume(ctx, app, v.ID, fly.UpdateVolumeRequest{SnapshotRetention: &three}))(t, "UpdateVolume")
	if upd.SnapshotRetention != 3 {
		t.Errorf("UpdateVolume: snapshot_retention %d, want 3", upd.SnapshotRetention)
	}
	fork := must(c.CreateVolume(ctx, app, fly.CreateVolumeRequest{Name: "data_fork", SourceVolumeID: &v.ID}))(t, "fork")
	if fork.ID == v.ID || fork.SizeGb != 2 {
		t.Errorf("fork: %+v", fork)
	}
	reader := must(c.Launch(ctx, app, fly.LaunchMachineInput{Config: &fly.MachineConfig{Image: image,
		Init: fly.MachineInit{Cmd: loop}, Mounts: []fly.MachineMount{{Volume: fork.ID, Path: "/data"}}}}))(t, "Launch on the fork")
	ok(t, "Wait reader", c.Wait(ctx, app, reader, "started", 60*time.Second))
	if out := execOut(t, ctx, c, app, reader.ID, "busybox cat /data/file"); out != "kept\n" {
		t.Errorf("the fork holds %q, want the source's file", out)
	}
	for _, id := range []string{writer.ID, reader.ID} {
		ok(t, "Destroy "+id, c.Destroy(ctx, app, fly.RemoveMachineInput{ID: id, Kill: true}, ""))
	}
	for _, id := range []string{v.ID, fork.ID} {
		gone := must(c.DeleteVolume(ctx, app, id))(t, "DeleteVolume")
		if gone.ID != id {
			t.Errorf("DeleteVolume answered %+v", gone)
		}
	}
	if vs := must(c.GetVolumes(ctx, app))(t, "GetVolumes"); len(vs) != 0 {
		t.Errorf("volumes left after delete: %+v", vs)
	}
}

// beyondFlaps sends what Fly documents and flaps never sends.
func beyondFlaps(t *testing.T, k *kiln, ctx context.Context, c *flaps.Client, app string) {
	m := must(c.Launch(ctx, app, fly.LaunchMachineInput{Config: &fly.MachineConfig{Image: image, Init: fly.MachineInit{Cmd: loop},
		Metadata: map[string]string{"group": "a"}}}))(t, "Launch")
	base := "/v1/apps/" + app + "/machines"

	// FlyV1 authorization, as flyctl sends it for macaroon tokens.
	if code := k.do("GET", base, "FlyV1 "+k.token, nil, nil); code != http.StatusOK {
		t.Errorf("FlyV1 authorization: %d", code)
	}
	if code := k.do("GET", base, "FlyV1 wrong", nil, nil); code != http.StatusUnauthorized {
		t.Errorf("a wrong FlyV1 token: %d, want 401", code)
	}

	// Waiting for one of several states, by version.
	var waited struct {
		State string `json:"state"`
	}
	if code := k.do("GET", fmt.Sprintf("%s/%s/wait?version=%s&state=started&state=stopped&timeout=60", base, m.ID, m.Version), "", nil, &waited); code != http.StatusOK || waited.State != "started" {
		t.Errorf("wait for started or stopped: %d, %+v", code, waited)
	}

	// Bulk metadata sets several keys at once.
	if code := k.do("PUT", base+"/"+m.ID+"/metadata", "", map[string]any{"metadata": map[string]string{"group": "b", "zone": "1"}}, nil); code >= 300 {
		t.Errorf("bulk metadata: %d", code)
	}
	var md map[string]string
	k.do("GET", base+"/"+m.ID+"/metadata", "", nil, &md)
	if md["group"] != "b" || md["zone"] != "1" {
		t.Errorf("after bulk metadata: %v", md)
	}

	// Events, limited.
	var evs []fly.MachineEvent
	if code := k.do("GET", base+"/"+m.ID+"/events?limit=1", "", nil, &evs); code != http.StatusOK || len(evs) != 1 {
		t.Errorf("events?limit=1: %d, %d events", code, len(evs))
	}

	// List filters: state, metadata, summary, include_deleted. Each answer is decoded
	// afresh: decoding into a used slice would keep the last answer's fields.
	var list []fly.Machine
	k.do("GET", base+"?state=started,stopped", "", nil, &list)
	if len(list) != 1 {
		t.Errorf("list state=started,stopped: %d machines, want 1", len(list))
	}
	list = nil
	k.do("GET", base+"?metadata.zone=1", "", nil, &list)
	if len(list) != 1 || list[0].ID != m.ID {
		t.Errorf("list metadata.zone=1: %+v", list)
	}
	list = nil
	k.do("GET", base+"?summary=true", "", nil, &list)
	if len(list) != 1 || list[0].Config != nil {
		t.Errorf("list summary=true still has the config: %+v", list)
	}
	ok(t, "Destroy", c.Destroy(ctx, app, fly.RemoveMachineInput{ID: m.ID, Kill: true}, ""))
	list = nil
	k.do("GET", base, "", nil, &list)
	n := len(list)
	list = nil
	k.do("GET", base+"?include_deleted=true", "", nil, &list)
	if len(list) <= n {
		t.Errorf("include_deleted=true lists %d machines, without it %d", len(list), n)
	}

	// Errors carry Fly's status word beside the message.
	var e struct {
		Error  string `json:"error"`
		Status string `json:"status"`
	}
	req, _ := http.NewRequest("GET", k.url+base+"/no-such-machine", nil)
	req.Header.Set("Authorization", "Bearer "+k.token)
	resp, err := http.DefaultClient.Do(req)
	ok(t, "GET missing machine", err)
	json.NewDecoder(resp.Body).Decode(&e)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound || e.Error == "" || e.Status != "unknown" {
		t.Errorf("a missing machine: %d %+v", resp.StatusCode, e)
	}
}
