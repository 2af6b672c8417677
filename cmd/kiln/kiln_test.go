package main_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/testutil"
)

var kilnBin, buildkitdBin string

func TestMain(m *testing.M) {
	// Servers give machines networks: bridges, TAP devices, rules and traffic stay in a
	// network namespace of the tests' own.
	if code, ran := testutil.InNetNS(); ran {
		os.Exit(code)
	}
	code := m.Run()
	testutil.StopPostgres()
	if kilnBin != "" {
		os.RemoveAll(filepath.Dir(kilnBin))
	}
	os.Exit(testutil.Finish(code))
}

// buildKiln builds kiln and kiln-init from this checkout, once.
func buildKiln(t *testing.T) {
	t.Helper()
	if kilnBin == "" {
		dir, err := os.MkdirTemp("", "kiln-cli-")
		if err != nil {
			t.Fatal(err)
		}
		kilnBin = testutil.GoBuild(t, "./cmd/kiln", dir)
		testutil.GoBuild(t, "./cmd/kiln-init", dir)
	}
}

// env is a private data dir sharing the test asset cache.
type env struct {
	t       *testing.T
	dataDir string
	extra   []string // more environment for every kiln it runs
}

func newEnv(t *testing.T) *env {
	t.Helper()
	testutil.Assets(t) // builds the shared assets once
	buildKiln(t)
	if buildkitdBin == "" {
		// The server finds the builder root filesystem by this buildkitd's hash.
		testutil.BuilderRootfs(t)
		buildkitdBin = filepath.Join(testutil.Root(), "bin", "buildkitd")
	}
	e := &env{t: t, dataDir: testutil.TempDir(t)}
	t.Cleanup(func() { testutil.RequireNothingLeft(t, e.dataDir) })
	return e
}

func (e *env) cmd(args ...string) *exec.Cmd {
	c := exec.Command(kilnBin, args...)
	c.Env = append(os.Environ(), "KILN_DATA_DIR="+e.dataDir, "KILN_ASSETS_DIR="+filepath.Join(testutil.DataDir(), "assets"),
		"KILN_BUILDKITD="+buildkitdBin)
	c.Env = append(c.Env, e.extra...)
	return c
}

// run runs kiln and returns stdout, stderr and the exit code.
func (e *env) run(stdin string, args ...string) (string, string, int) {
	e.t.Helper()
	c := e.cmd(args...)
	c.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	c.Stdout, c.Stderr = &out, &errb
	if err := c.Start(); err != nil {
		e.t.Fatal(err)
	}
	// A command that hangs fails the test instead of holding CI until its deadline.
	hung := time.AfterFunc(5*time.Minute, func() { c.Process.Kill() })
	err := c.Wait()
	if !hung.Stop() {
		e.t.Fatalf("kiln %s did not finish within 5 minutes; its output:\n%s\n%s", strings.Join(args, " "), out.String(), errb.String())
	}
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

func TestVMRun(t *testing.T) {
	e := newEnv(t)
	out, errs, code := e.run("", "vm", "run", "--", "sh", "-c", "echo hello from $(uname -r); exit 3")
	if code != 3 || !strings.HasPrefix(out, "hello from ") {
		t.Errorf("demo: exit %d, stdout %q, stderr %q", code, out, errs)
	}

	out, _, code = e.run("piped through\n", "vm", "run", "--cpus", "2", "--memory", "384", "-e", "K=V", "-w", "/etc", "--", "sh", "-c", "cat; echo $K $(pwd) $(nproc)")
	if code != 0 || out != "piped through\nV /etc 2\n" {
		t.Errorf("stdin/env/workdir/cpus: exit %d, %q", code, out)
	}

	_, errs, code = e.run("", "vm", "run", "--", "kiln-no-such-command", "arg")
	if code != 127 || !strings.Contains(errs, "kiln-no-such-command") {
		t.Errorf("missing command: exit %d, stderr %q", code, errs)
	}

	_, errs, code = e.run("", "vm", "run", "--", "sh", "-c", "kill -KILL $$")
	if code != 137 || !strings.Contains(errs, "SIGKILL") {
		t.Errorf("killed command: exit %d, stderr %q", code, errs)
	}

	_, errs, code = e.run("", "vm", "run", "--timeout", "1s", "--", "sleep", "60")
	if code != 124 || !strings.Contains(errs, "timed out") {
		t.Errorf("timeout: exit %d, stderr %q", code, errs)
	}

	_, errs, code = e.run("", "vm", "run", "--verbose", "--", "true")
	if code != 0 || !strings.Contains(errs, "accelerator tcg") && !strings.Contains(errs, "accelerator kvm") {
		t.Errorf("verbose names no accelerator: %q", errs)
	}
}

func TestVMRunDisk(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dataDir, "data.ext4")
	if _, errs, code := e.run("", "disk", "create", img, "--size", "64M"); code != 0 {
		t.Fatalf("disk create: %s", errs)
	}
	if _, errs, code := e.run("", "vm", "run", "--disk", img+":/data", "--", "sh", "-c", "echo kept > /data/f"); code != 0 {
		t.Fatalf("write: %s", errs)
	}
	out, errs, code := e.run("", "vm", "run", "--disk", img+":/mnt/d", "--", "cat", "/mnt/d/f")
	if code != 0 || out != "kept\n" {
		t.Errorf("read in a second VM: exit %d %q %s", code, out, errs)
	}
	out, _, _ = e.run("", "disk", "info", "--json", img)
	var info struct {
		Total int64 `json:"total_bytes"`
		Used  int64 `json:"used_bytes"`
	}
	if json.Unmarshal([]byte(out), &info); info.Total < 60<<20 || info.Used <= 0 {
		t.Errorf("disk info: %s", out)
	}
	if _, errs, code := e.run("", "disk", "extend", img, "--size", "128M"); code != 0 {
		t.Errorf("extend: %s", errs)
	}
	out, _, code = e.run("", "vm", "run", "--disk", img+":/data", "--", "sh", "-c", "cat /data/f; df -m /data | tail -1")
	if code != 0 || !strings.HasPrefix(out, "kept\n") {
		t.Errorf("after extend: %q", out)
	}
	if _, errs, code := e.run("", "disk", "rm", img); code != 0 {
		t.Errorf("rm: %s", errs)
	}
}

func TestVMRunBadInput(t *testing.T) {
	e := newEnv(t)
	junk := filepath.Join(e.dataDir, "junk.img")
	os.WriteFile(junk, make([]byte, 1<<20), 0o644)
	good := filepath.Join(e.dataDir, "good.ext4")
	e.run("", "disk", "create", good, "--size", "16M")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--memory", "99999999"}, 2, "memory=99999999 MiB is out of range"},
		{[]string{"--memory", "10"}, 2, "memory=10 MiB is out of range"},
		{[]string{"--cpus", "0"}, 2, "cpus=0 is out of range"},
		{[]string{"--cpus", "999"}, 2, "cpus=999 is out of range"},
		{[]string{"--disk", junk + ":/data"}, 2, "not an ext4 image"},
		{[]string{"--disk", good + ":data"}, 2, "must be an absolute path"},
		{[]string{"--disk", good}, 2, "want FILE:/mount/point"},
		{[]string{"--disk", "/nonexistent.ext4:/data"}, 1, "does not exist"},
		{[]string{"--vmm", "bogus"}, 2, "use qemu, firecracker or auto"},
		// No firecracker binary here: refused, naming what is missing and the way out.
		{[]string{"--vmm", "firecracker"}, 2, "the firecracker binary (firecracker) is not on this host"},
		{[]string{"--kernel", "/nonexistent-kernel"}, 2, "/nonexistent-kernel"},
		{[]string{"--workdir", "relative"}, 2, "absolute"},
		{[]string{"--env", "NOEQUALS"}, 2, "KEY=VALUE"},
	} {
		args := append(append([]string{"vm", "run"}, tc.args...), "--", "true")
		_, errs, code := e.run("", args...)
		if code != tc.code || !strings.Contains(errs, tc.want) || strings.Count(strings.TrimSpace(errs), "\n") > 0 {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and one line with %q", tc.args, code, errs, tc.code, tc.want)
		}
	}
	// A missing QEMU is named with its package and the command that installs it.
	c := e.cmd("vm", "run", "--", "true")
	c.Env = append(c.Env, "PATH=/nonexistent")
	errb, _ := c.CombinedOutput()
	if !strings.Contains(string(errb), "qemu-system-x86") || !strings.Contains(string(errb), "make setup") {
		t.Errorf("without QEMU: %q", errb)
	}
}

// startSleeper starts `kiln vm run` with a command that prints a line and then sleeps, and
// returns once the guest has printed it.
func startSleeper(t *testing.T, e *env) *exec.Cmd {
	t.Helper()
	c := e.cmd("vm", "run", "--", "sh", "-c", "echo ready; sleep 600")
	stdout, _ := c.StdoutPipe()
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- l
		io.Copy(io.Discard, stdout)
	}()
	select {
	case l := <-line:
		if l != "ready\n" {
			t.Fatalf("guest said %q", l)
		}
	case <-time.After(2 * time.Minute):
		c.Process.Kill()
		t.Fatal("the VM did not come up")
	}
	return c
}

func TestVMRunCleansUpOnSignals(t *testing.T) {
	e := newEnv(t)
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		c := startSleeper(t, e)
		c.Process.Signal(sig)
		done := make(chan error, 1)
		go func() { done <- c.Wait() }()
		select {
		case <-done:
		case <-time.After(time.Minute):
			c.Process.Kill()
			t.Fatalf("kiln did not exit after %v", sig)
		}
		if c.ProcessState.ExitCode() != 130 {
			t.Errorf("exit code after %v = %d, want 130", sig, c.ProcessState.ExitCode())
		}
		testutil.RequireNothingLeft(t, e.dataDir)
	}
}

func TestReapAfterSIGKILL(t *testing.T) {
	e := newEnv(t)
	c := startSleeper(t, e)
	c.Process.Kill()
	c.Wait()
	// The VMM outlives a SIGKILLed kiln...
	if len(testutil.ProcessesNaming(e.dataDir)) == 0 {
		t.Fatal("expected the VMM to outlive kiln")
	}
	// ...until the next kiln command finds it and says so.
	_, errs, code := e.run("", "vm", "run", "--", "true")
	if code != 0 || !strings.Contains(errs, "reaped VM") {
		t.Errorf("next run: exit %d, stderr %q", code, errs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for len(testutil.ProcessesNaming(e.dataDir)) > 0 && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
	}
}

func TestVMRunImage(t *testing.T) {
	e := newEnv(t)
	img := imagetest.App(t)
	docker := filepath.Join(e.dataDir, "app.tar")
	imagetest.WriteDockerTarball(t, img, "localhost/app:1", docker)

	// No command: the image's entrypoint and cmd, as its user, in its workdir, with its env.
	out, errs, code := e.run("", "vm", "run", "--image", docker)
	if code != 0 || out != "hi from 1234 in /data\n" {
		t.Errorf("image command: exit %d, %q, %s", code, out, errs)
	}
	// A command and env from the command line win; the top layer's whiteout holds.
	out, errs, code = e.run("", "vm", "run", "--image", docker, "-e", "GREETING=hey", "--", "sh", "-c", "echo $GREETING; cat added; ls /etc")
	if code != 0 || out != "hey\nsecond layer\ngroup\npasswd\n" {
		t.Errorf("image with command: exit %d, %q, %s", code, out, errs)
	}
	_, errs, code = e.run("", "vm", "run", "--image", filepath.Join(e.dataDir, "missing.tar"))
	if code == 0 || !strings.Contains(errs, "missing.tar") {
		t.Errorf("missing image: exit %d, %s", code, errs)
	}
}

func TestCLIConfigFile(t *testing.T) {
	e := newEnv(t)
	cfg := filepath.Join(e.dataDir, "config.toml")
	os.WriteFile(cfg, []byte("api_url = \"http://127.0.0.1:1\"\ntoken = \"x\"\n"), 0o600)
	c := e.cmd("machine", "ls", "--app", "web")
	c.Env = append(c.Env, "KILN_CONFIG="+cfg, "KILN_API_URL=")
	out, _ := c.CombinedOutput()
	if !strings.Contains(string(out), "cannot reach the kiln server at http://127.0.0.1:1") {
		t.Errorf("config api_url not used: %s", out)
	}
	os.WriteFile(cfg, []byte("api_ur = \"http://x\"\n"), 0o600)
	c = e.cmd("machine", "ls", "--app", "web")
	c.Env = append(c.Env, "KILN_CONFIG="+cfg)
	out, _ = c.CombinedOutput()
	if !strings.Contains(string(out), `unknown setting "api_ur"`) {
		t.Errorf("unknown config key: %s", out)
	}
}
