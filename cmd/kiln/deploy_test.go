package main_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image/imagetest"
)

// shopToml is a fly.toml in the shape of Fly's documentation: a web process serving
// its greeting and a secret, an HTTP service with a health check, a rolling deploy.
func shopToml(greeting, checkPath, strategy, wait string) string {
	return fmt.Sprintf(`# fly.toml app configuration file
app = "shop"
primary_region = "ord"
kill_signal = "SIGTERM"
kill_timeout = "5s"

[build]
  image = "localhost/app:1"

[env]
  GREETING = %q

[processes]
  app = "sh -c 'echo $GREETING $API_KEY > /data/index.html; exec busybox httpd -f -p 8080 -h /data'"

[http_service]
  internal_port = 8080
  force_https = true
  auto_stop_machines = "off"
  auto_start_machines = false
  min_machines_running = 0
  processes = ["app"]

  [[http_service.checks]]
    grace_period = "1s"
    interval = "1s"
    method = "GET"
    timeout = "2s"
    path = %q

[[files]]
  guest_path = "/data/files/motd"
  raw_value = "bW90ZC12MQo="

[[files]]
  guest_path = "/data/files/local.conf"
  local_path = "local.conf"

[deploy]
  strategy = %q
  max_unavailable = 1
  wait_timeout = %q

[kiln]
  counts = { app = 2 }
`, greeting, checkPath, strategy, wait)
}

// traffic sends requests through the proxy until stopped, counting the failures.
type traffic struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	last       string
	failures   []string
	stop       chan struct{}
	done       chan struct{}
}

func sendTraffic(proxyAddr, host string) *traffic {
	tr := &traffic{stop: make(chan struct{}), done: make(chan struct{})}
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	go func() {
		defer close(tr.done)
		for {
			select {
			case <-tr.stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			req, _ := http.NewRequest("GET", "http://"+proxyAddr+"/", nil)
			req.Host = host
			resp, err := c.Do(req)
			if err != nil {
				tr.fail(err.Error())
				continue
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				tr.fail(fmt.Sprintf("%s: %s", resp.Status, b))
				continue
			}
			tr.ok.Add(1)
			tr.mu.Lock()
			tr.last = strings.TrimSpace(string(b))
			tr.mu.Unlock()
		}
	}()
	return tr
}

func (tr *traffic) fail(why string) {
	tr.failed.Add(1)
	tr.mu.Lock()
	if len(tr.failures) < 5 {
		tr.failures = append(tr.failures, why)
	}
	tr.mu.Unlock()
}

func (tr *traffic) end() { close(tr.stop); <-tr.done }

func (tr *traffic) body() string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.last
}

// A deploy from a fly.toml, rolling, canary and bluegreen updates watched through the
// proxy with no failed request, secrets that reach the workload but no answer or log,
// a plan's exact diff, an automatic rollback on a failing check, kill -9 of the server
// mid-deploy and its recovery, and kiln rollback.
func TestDeployEndToEnd(t *testing.T) {
	e := newEnv(t)
	addr, proxyAddr := freeAddr(t), freeAddr(t)
	srv := startServer(t, e, addr, "--proxy-listen", proxyAddr)
	defer stopOnFailure(&srv)
	ctx := context.Background()
	cl := client.New(srv.url, readToken(t, filepath.Join(e.dataDir, "admin-token")))
	loadImage(t, srv, imagetest.App(t), "localhost/app:1")
	if err := cl.CreateApp(ctx, "shop"); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(toml string) string {
		p := filepath.Join(dir, "fly.toml")
		if err := os.WriteFile(p, []byte(toml), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if err := os.WriteFile(filepath.Join(dir, "local.conf"), []byte("local-v1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	deploy := func(toml string, args ...string) (string, string, int) {
		t.Helper()
		return srv.kiln("", append([]string{"deploy", "--yes", "-c", write(toml)}, args...)...)
	}
	// workloads is every machine's output, for a failure's message.
	workloads := func() string {
		ms, _ := cl.ListMachines(ctx, "shop")
		var b strings.Builder
		for _, m := range ms {
			out, errs, _ := srv.kiln("", "logs", m.ID)
			fmt.Fprintf(&b, "machine %s (%s):\n%s%s", m.ID, m.State, out, errs)
		}
		return b.String()
	}
	machineIDs := func() []string {
		ms, err := cl.ListMachines(ctx, "shop")
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, m := range ms {
			if m.State != "destroyed" {
				ids = append(ids, m.ID)
			}
		}
		return ids
	}

	// Bad input is refused before anything is recorded.
	if _, errs, code := deploy(shopToml("v1", "/", "sideways", "60s")); code == 0 || !strings.Contains(errs, "sideways") {
		t.Fatalf("unknown strategy: exit %d: %s", code, errs)
	}
	if _, errs, code := deploy("app = \"shop\"\n[env]\n  A = 1 2\n"); code == 0 || !strings.Contains(errs, "fly.toml:3:") {
		t.Fatalf("syntax error without its line: exit %d: %s", code, errs)
	}
	if _, errs, code := srv.kiln("", "secrets", "set", "--app", "shop", "1BAD=x"); code == 0 || !strings.Contains(errs, "1BAD") {
		t.Fatalf("bad secret name: exit %d: %s", code, errs)
	}

	// Release 1: two machines from the fly.toml.
	if out, errs, code := deploy(shopToml("v1", "/", "rolling", "60s")); code != 0 || !strings.Contains(out, "release 1 succeeded") {
		t.Fatalf("first deploy: exit %d\n%s\n%s\n%s\n%s", code, out, errs, workloads(), srv.logs)
	}
	if ids := machineIDs(); len(ids) != 2 {
		t.Fatalf("release 1 made %d machines, want 2", len(ids))
	} else if res, err := cl.Exec(ctx, "shop", ids[0], []string{"busybox", "cat", "/data/files/motd", "/data/files/local.conf"}, "", 30*time.Second); err != nil || res.Stdout != "motd-v1\nlocal-v1\n" {
		t.Fatalf("[[files]] in the machine: %+v %v", res, err)
	}
	tr := sendTraffic(proxyAddr, "shop.kiln.internal")
	defer func() {
		select {
		case <-tr.stop:
		default:
			tr.end()
		}
	}()
	waitFor(t, func() bool { return tr.ok.Load() > 0 }, "the first request through the proxy")

	// A secret, and a changed env var: the plan names exactly what changes.
	const secret = "s3cret-value-7f1c"
	if out, errs, code := srv.kiln("", "secrets", "set", "--app", "shop", "API_KEY="+secret); code != 0 || strings.Contains(out+errs, secret) {
		t.Fatalf("secrets set: exit %d: %s %s", code, out, errs)
	}
	out, errs, code := srv.kiln("", "plan", "-c", write(shopToml("v2", "/", "rolling", "60s")))
	if code != 0 || !strings.Contains(out, `env.GREETING: "v1" -> "v2"`) || !strings.Contains(out, "secrets_version: 0 -> 1") || !strings.Contains(out, "2 update") {
		t.Fatalf("plan: exit %d\n%s\n%s", code, out, errs)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "    ") && !strings.Contains(line, "GREETING") && !strings.Contains(line, "secrets_version") {
			t.Fatalf("plan shows a field that did not change: %q\n%s", line, out)
		}
	}

	// A deploy whose plan is no longer the one approved is refused, changing nothing.
	_, err := cl.Deploy(ctx, "shop", api.DeployRequest{Config: shopToml("v2", "/", "rolling", "60s"), ExpectPlan: "0123456789abcdef",
		LocalFiles: map[string]string{"local.conf": base64.StdEncoding.EncodeToString([]byte("local-v1\n"))}})
	if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "no longer the one approved") {
		t.Fatalf("deploy with a stale plan: %v", err)
	}

	// Rolling: every request during the roll is answered.
	if out, errs, code := deploy(shopToml("v2", "/", "rolling", "60s")); code != 0 || !strings.Contains(out, "release 2 succeeded") {
		t.Fatalf("rolling deploy: exit %d\n%s\n%s\n%s\n%s", code, out, errs, workloads(), srv.logs)
	}
	waitFor(t, func() bool { return tr.body() == "v2 "+secret }, "the new release's answer with its secret")
	if n := tr.failed.Load(); n != 0 {
		t.Fatalf("%d of %d requests failed during the rolling deploy: %v", n, n+tr.ok.Load(), tr.failures)
	}
	t.Logf("rolling deploy: %d requests, 0 failed", tr.ok.Load())

	// The secret reached the workload, and no API answer, event or log line.
	ms, _ := cl.ListMachines(ctx, "shop")
	raw, _ := json.Marshal(ms)
	rels, _ := cl.Releases(ctx, "shop")
	rawRels, _ := json.Marshal(rels)
	evs, _ := cl.ListEvents(ctx, client.EventQuery{App: "shop"})
	rawEvs, _ := json.Marshal(evs)
	sec, _ := cl.Secrets(ctx, "shop")
	rawSec, _ := json.Marshal(sec)
	for what, s := range map[string]string{"machines": string(raw), "releases": string(rawRels), "events": string(rawEvs), "secrets": string(rawSec), "server log": srv.logs.String()} {
		if strings.Contains(s, secret) {
			t.Fatalf("the secret's value is in the %s", what)
		}
	}
	if len(sec.Names) != 1 || sec.Names[0] != "API_KEY" || sec.Version != 1 {
		t.Fatalf("secrets ls: %+v", sec)
	}

	// Canary, then bluegreen (new machines, traffic switched once they are healthy).
	if out, errs, code := deploy(shopToml("v3", "/", "canary", "60s")); code != 0 || !strings.Contains(out, "release 3 succeeded") {
		t.Fatalf("canary deploy: exit %d\n%s\n%s", code, out, errs)
	}
	waitFor(t, func() bool { return strings.HasPrefix(tr.body(), "v3 ") }, "the canary release's answer")
	before := machineIDs()
	if out, errs, code := deploy(shopToml("v4", "/", "bluegreen", "60s")); code != 0 || !strings.Contains(out, "release 4 succeeded") {
		t.Fatalf("bluegreen deploy: exit %d\n%s\n%s", code, out, errs)
	}
	after := machineIDs()
	if len(after) != 2 || after[0] == before[0] || after[0] == before[1] || after[1] == before[0] || after[1] == before[1] {
		t.Fatalf("bluegreen kept machines: before %v, after %v", before, after)
	}
	waitFor(t, func() bool { return strings.HasPrefix(tr.body(), "v4 ") }, "the bluegreen release's answer")
	if n := tr.failed.Load(); n != 0 {
		t.Fatalf("%d requests failed during the canary and bluegreen deploys: %v", n, tr.failures)
	}

	// A check that never passes: rolled back, and release 4 serves throughout.
	out, errs, code = deploy(shopToml("v5", "/missing", "rolling", "8s"))
	if code != 1 || !strings.Contains(out, "release 5 rolled back") {
		t.Fatalf("failing check: exit %d\n%s\n%s", code, out, errs)
	}
	rel5, _ := cl.Release(ctx, "shop", 5)
	if rel5.State != "rolled_back" || !strings.Contains(rel5.Message, "release 4 serves again") {
		t.Fatalf("release 5: %+v", rel5)
	}
	if n := tr.failed.Load(); n != 0 {
		t.Fatalf("%d requests failed while release 5 failed its checks: %v", n, tr.failures)
	}
	if b := tr.body(); !strings.HasPrefix(b, "v4 ") {
		t.Fatalf("after the rollback the app answers %q, want release 4's", b)
	}
	tr.end()

	// kill -9 of the server mid-deploy: the restarted server resumes the deploy.
	if out, errs, code := deploy(shopToml("v6", "/", "rolling", "60s"), "--detach"); code != 0 || strings.TrimSpace(out) != "6" {
		t.Fatalf("detached deploy: exit %d: %s %s", code, out, errs)
	}
	waitFor(t, func() bool {
		r, err := cl.Release(ctx, "shop", 6)
		return err == nil && strings.Contains(r.Message, "changing")
	}, "release 6 to start changing machines")
	srv.stop(syscall.SIGKILL)
	srv = startServer(t, e, addr, "--proxy-listen", proxyAddr)
	var rel6 api.Release
	deadline := time.Now().Add(3 * time.Minute)
	for rel6.State != "succeeded" && time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		rel6, _ = cl.Release(ctx, "shop", 6)
		if rel6.State == "failed" || rel6.State == "rolled_back" {
			break
		}
	}
	if rel6.State != "succeeded" || !strings.Contains(srv.logs.String(), "resuming it") || !strings.Contains(rel6.Message, "resumed after 1 server restart") {
		t.Fatalf("release 6 after kill -9: %+v\n%s", rel6, srv.logs)
	}
	tr = sendTraffic(proxyAddr, "shop.kiln.internal")
	waitFor(t, func() bool { return strings.HasPrefix(tr.body(), "v6 ") }, "release 6's answer after the restart")
	if ids := machineIDs(); len(ids) != 2 {
		t.Fatalf("after the resumed deploy the app has %d machines, want 2", len(ids))
	}

	// kiln rollback deploys release 4 (the one before 6 that succeeded) again.
	if out, errs, code := srv.kiln("", "rollback", "--app", "shop"); code != 0 || !strings.Contains(out, "release 7 succeeded") {
		t.Fatalf("rollback: exit %d\n%s\n%s", code, out, errs)
	}
	waitFor(t, func() bool { return strings.HasPrefix(tr.body(), "v4 ") }, "release 4's answer after kiln rollback")
	tr.end()
	out, _, _ = srv.kiln("", "releases", "--app", "shop")
	states := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 2 && strings.HasPrefix(f[0], "v") {
			states[f[0]] = f[1] + " " + f[2]
		}
	}
	want := map[string]string{"v1": "succeeded rolling", "v3": "succeeded canary", "v4": "succeeded bluegreen",
		"v5": "rolled_back rolling", "v6": "succeeded rolling", "v7": "succeeded bluegreen"}
	for v, w := range want {
		if states[v] != w {
			t.Fatalf("kiln releases shows %s as %q, want %q:\n%s", v, states[v], w, out)
		}
	}
	// Scale to zero: a release that destroys every machine, leaving nothing behind.
	if out, errs, code := srv.kiln("", "scale", "count", "0", "--app", "shop"); code != 0 || !strings.Contains(out, "release 8 succeeded") {
		t.Fatalf("scale count 0: exit %d\n%s\n%s", code, out, errs)
	}
	if ids := machineIDs(); len(ids) != 0 {
		t.Fatalf("after scaling to 0 the app has machines %v", ids)
	}

	// An app with [mounts]: each machine gets its own volume (data, data_2), a rolling
	// update keeps it, and what the workload wrote there survives the update.
	vol := func(greeting string) string {
		return fmt.Sprintf(`app = "vault"
[build]
  image = "localhost/app:1"
[env]
  GREETING = %q
[processes]
  app = "sh -c 'while true; do sleep 1; done'"
[mounts]
  source = "data"
  destination = "/data"
  initial_size = "1gb"
[deploy]
  strategy = "rolling"
  wait_timeout = "60s"
[kiln]
  counts = { app = 2 }
`, greeting)
	}
	volsDir := t.TempDir()
	deployVault := func(greeting string) {
		t.Helper()
		p := filepath.Join(volsDir, "fly.toml")
		os.WriteFile(p, []byte(vol(greeting)), 0o644)
		if out, errs, code := srv.kiln("", "deploy", "--yes", "-c", p); code != 0 || !strings.Contains(out, "succeeded") {
			t.Fatalf("deploy of an app with [mounts] (%s): exit %d\n%s\n%s", greeting, code, out, errs)
		}
	}
	deployVault("v1")
	vms, _ := cl.ListMachines(ctx, "vault")
	var vaultIDs []string
	for _, m := range vms {
		if m.State == "started" {
			vaultIDs = append(vaultIDs, m.ID)
			if res, err := cl.Exec(ctx, "vault", m.ID, []string{"sh", "-c", "echo kept-" + m.ID + " > /data/note"}, "", 30*time.Second); err != nil || res.ExitCode != 0 {
				t.Fatalf("writing to the volume: %+v %v", res, err)
			}
		}
	}
	vs, _ := cl.ListVolumes(ctx, "vault")
	if len(vaultIDs) != 2 || len(vs) != 2 {
		t.Fatalf("an app with [mounts] and 2 machines: machines %v, volumes %+v", vaultIDs, vs)
	}
	deployVault("v2")
	for _, id := range vaultIDs {
		res, err := cl.Exec(ctx, "vault", id, []string{"sh", "-c", "cat /data/note; echo $GREETING"}, "", 30*time.Second)
		if err != nil || res.Stdout != "kept-"+id+"\nv2\n" {
			t.Fatalf("machine %s after the rolling update: %+v %v", id, res, err)
		}
	}
	if _, errs, code := srv.kiln("", "scale", "count", "0", "--app", "vault"); code != 0 {
		t.Fatalf("scale vault to 0: %s", errs)
	}
	for _, v := range vs {
		cl.DeleteVolume(ctx, "vault", v.ID)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}
