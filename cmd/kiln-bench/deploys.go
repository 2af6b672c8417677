package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/vishvananda/netlink"

	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/testutil"
)

// deployEnv marks the bench's child that runs the deploy benchmark in a network
// namespace of its own: the server it starts gives machines bridges, TAP devices and
// rules, and none of them may touch the host's network.
const deployEnv = "KILN_BENCH_DEPLOY_NETNS"

// benchDeploysIsolated runs benchDeploys in a child of this binary in a new network
// namespace, and adds the rows it reports.
func benchDeploysIsolated(ctx context.Context, add func(string, float64, string, string)) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	out, err := os.CreateTemp("", "kiln-bench-deploy-*.json")
	if err != nil {
		return err
	}
	out.Close()
	defer os.Remove(out.Name())
	cmd := exec.CommandContext(ctx, exe, "-only", "deploy-child", "-out", out.Name())
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.Env = append(os.Environ(), deployEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("the deploy benchmark (in its own network namespace): %w", err)
	}
	raw, err := os.ReadFile(out.Name())
	if err != nil {
		return err
	}
	var rs []result
	if err := json.Unmarshal(raw, &rs); err != nil {
		return err
	}
	for _, r := range rs {
		add(r.Name, r.Value, r.Unit, r.Note)
	}
	return nil
}

// deployChild is the child's whole run: loopback up, the benchmark, its rows as JSON.
func deployChild(ctx context.Context, out string) error {
	if lo, err := netlink.LinkByName("lo"); err == nil {
		netlink.LinkSetUp(lo)
	}
	var rs []result
	err := benchDeploys(ctx, func(name string, v float64, unit, note string) { rs = append(rs, result{name, v, unit, note}) })
	if err != nil {
		return err
	}
	raw, _ := json.Marshal(rs)
	return os.WriteFile(out, raw, 0o644)
}

// The sample app: a static site in busybox httpd, two machines behind an HTTP check.
const (
	deployDockerfile = `FROM localhost/bench-base:1
COPY site /site
CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/site"]
`
	deployToml = `app = "bench-web"
primary_region = "ord"
kill_signal = "SIGTERM"
kill_timeout = "5s"

[build]
  dockerfile = "Dockerfile"

[http_service]
  internal_port = 8080
  auto_stop_machines = "off"
  auto_start_machines = false

  [[http_service.checks]]
    grace_period = "1s"
    interval = "1s"
    timeout = "2s"
    method = "GET"
    path = "/"

[deploy]
  strategy = "rolling"
  max_unavailable = 1

[kiln]
  counts = { app = 2 }
`
)

// benchDeploys times deploy_commit_to_healthy: the sample app deployed once, one file
// changed, then `kiln deploy` until every machine is healthy on the new release.
func benchDeploys(ctx context.Context, add func(string, float64, string, string)) error {
	kiln := "bin/kiln"
	if exe, err := os.Executable(); err == nil {
		if p := filepath.Join(filepath.Dir(exe), "kiln"); fileExists(p) {
			kiln = p
		}
	}
	if !fileExists(kiln) {
		return fmt.Errorf("%s not found: run make build first", kiln)
	}
	kiln, _ = filepath.Abs(kiln)
	bk, _ := filepath.Abs("bin/buildkitd")
	if v := os.Getenv("KILN_BUILDKITD"); v != "" {
		bk = v
	}
	assetsDir := os.Getenv("KILN_DATA_DIR")
	if assetsDir == "" {
		assetsDir = "/var/lib/kiln"
	}
	data, err := os.MkdirTemp("", "kiln-bench-deploy-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(data)
	env := append(os.Environ(), "KILN_DATA_DIR="+data, "KILN_ASSETS_DIR="+filepath.Join(assetsDir, "assets"), "KILN_BUILDKITD="+bk)
	apiAddr, proxyAddr := freeLocalAddr(), freeLocalAddr()
	srv := exec.Command(kiln, "server", "--listen", apiAddr, "--proxy-listen", proxyAddr, "--build-cache-size", "4G", "--builder-memory", "1024")
	srv.Env = env
	stderr, _ := srv.StderrPipe()
	if err := srv.Start(); err != nil {
		return err
	}
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "serving the API") {
				ready <- true
			}
			// What went wrong, if something does.
			if strings.Contains(sc.Text(), "fail") || strings.Contains(sc.Text(), "level=WARN") || strings.Contains(sc.Text(), "level=ERROR") {
				fmt.Fprintln(os.Stderr, "kiln server:", sc.Text())
			}
		}
		ready <- false
	}()
	var cl *client.Client
	defer func() {
		// Machines and builders outlive a server that stops, by design: the bench's
		// must not outlive the bench, nor load the host for the parts after it.
		if cl != nil {
			ms, _ := cl.ListMachines(context.WithoutCancel(ctx), "bench-web")
			for _, m := range ms {
				cl.Destroy(context.WithoutCancel(ctx), "bench-web", m.ID, true)
			}
			cl.RemoveBuilder(context.WithoutCancel(ctx), "bench-web")
		}
		srv.Process.Signal(syscall.SIGTERM)
		srv.Wait()
		testutil.KillProcessesNaming(data)
	}()
	if !<-ready {
		return fmt.Errorf("kiln server did not start")
	}
	token, err := os.ReadFile(filepath.Join(data, "admin-token"))
	if err != nil {
		return err
	}
	cl = client.New("http://"+apiAddr, strings.TrimSpace(string(token)))
	base, _, err := benchImage(0)
	if err != nil {
		return err
	}
	baseTar := filepath.Join(data, "base.tar")
	if err := tarball.WriteToFile(baseTar, nil, base); err != nil {
		return err
	}
	f, err := os.Open(baseTar)
	if err != nil {
		return err
	}
	_, err = cl.LoadImage(ctx, f, "localhost/bench-base:1")
	f.Close()
	if err != nil {
		return err
	}
	if err := cl.CreateApp(ctx, "bench-web"); err != nil {
		return err
	}
	dir := filepath.Join(data, "app")
	files := map[string]string{"Dockerfile": deployDockerfile, "fly.toml": deployToml, "site/index.html": "release one\n"}
	for i := 0; i < 20; i++ {
		files[fmt.Sprintf("site/page%02d.html", i)] = strings.Repeat(fmt.Sprintf("page %d\n", i), 100)
	}
	write := func() error {
		for name, body := range files {
			p := filepath.Join(dir, name)
			os.MkdirAll(filepath.Dir(p), 0o755)
			if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
				return err
			}
		}
		return nil
	}
	deploy := func(what string) (time.Duration, string, error) {
		if err := write(); err != nil {
			return 0, "", err
		}
		c := exec.CommandContext(ctx, kiln, "--api-url", "http://"+apiAddr, "deploy", "--yes")
		c.Dir, c.Env = dir, append(env, "KILN_API_TOKEN="+strings.TrimSpace(string(token)))
		start := time.Now()
		out, err := c.CombinedOutput()
		el := time.Since(start)
		if err != nil {
			return el, string(out), fmt.Errorf("%s deploy: %v\n%s", what, err, out)
		}
		fmt.Fprintf(os.Stderr, "%s deploy: %s\n", what, el.Round(time.Millisecond))
		return el, string(out), nil
	}
	if _, _, err := deploy("first"); err != nil {
		return err
	}
	files["site/index.html"] = "release two\n"
	total, out, err := deploy("one-file-change")
	if err != nil {
		return err
	}
	// Where the time went: the build (and its export and push) from its record, the
	// rollout from the release, each machine's boot from its events.
	rels, err := cl.Releases(ctx, "bench-web")
	if err != nil || len(rels) == 0 {
		return fmt.Errorf("releases: %v", err)
	}
	rel := rels[0]
	rollout := rel.UpdatedAt.Sub(rel.CreatedAt)
	m := regexp.MustCompile(`build (\S+) of bench-web queued`).FindStringSubmatch(out)
	if m == nil {
		return fmt.Errorf("no build in the deploy's output:\n%s", out)
	}
	b, err := cl.GetBuild(ctx, "bench-web", m[1])
	if err != nil {
		return err
	}
	var pushMS int64
	for _, st := range b.Steps {
		if strings.HasPrefix(st.Name, "exporting") || st.Name == build.PushStep {
			pushMS += st.Millis
		}
	}
	stops, boots, err := bootTimes(ctx, cl, rel.CreatedAt)
	if err != nil {
		return err
	}
	checks := rollout - mean(stops)*time.Duration(len(stops)) - mean(boots)*time.Duration(len(boots))
	add("deploy_commit_to_healthy", ms(total), "ms", fmt.Sprintf("kiln deploy after a one-file change until both machines pass their HTTP check on release %d (rolling, 2 machines; target under TCG: below 10 s)", rel.Version))
	add("deploy_build", float64(b.DurationMS), "ms", fmt.Sprintf("the build in the project's builder, %d/%d steps cached; export and push %d ms of it", b.CachedSteps, b.TotalSteps, pushMS))
	add("deploy_rollout", ms(rollout), "ms", "release created until every machine is healthy: stop, boot, checks, one machine at a time")
	add("deploy_machine_stop", ms(mean(stops)), "ms", fmt.Sprintf("a machine's stop for its update: SIGTERM until its VM is down (mean of %d)", len(stops)))
	add("deploy_machine_boot", ms(mean(boots)), "ms", fmt.Sprintf("its boot on the new config until its workload runs (mean of %d)", len(boots)))
	add("deploy_checks_and_drain", ms(checks), "ms", "rollout less the stops and boots: the first passing check, draining, the deploy's own calls")
	add("deploy_other", ms(total-rollout-time.Duration(b.DurationMS)*time.Millisecond), "ms", "the CLI, the context upload and queueing, the plan call")
	return nil
}

// bootTimes is, for each machine updated since t: its stop (asked to stop until
// stopped) and its boot (asked to start until started).
func bootTimes(ctx context.Context, cl *client.Client, since time.Time) (stops, boots []time.Duration, err error) {
	ms, err := cl.ListMachines(ctx, "bench-web")
	if err != nil {
		return nil, nil, err
	}
	for _, m := range ms {
		evs, err := cl.Events(ctx, "bench-web", m.ID)
		if err != nil {
			return nil, nil, err
		}
		sort.Slice(evs, func(i, j int) bool { return evs[i].Timestamp < evs[j].Timestamp })
		var stopAt, startAt int64
		for _, ev := range evs {
			if time.UnixMilli(ev.Timestamp).Before(since) {
				continue
			}
			switch {
			case ev.Type == "stop" && ev.Status == "stopping" && stopAt == 0:
				stopAt = ev.Timestamp
			case ev.Status == "stopped" && stopAt > 0 && startAt == 0:
				stops = append(stops, time.Duration(ev.Timestamp-stopAt)*time.Millisecond)
				stopAt = -1 << 62 // the update's own event says stopped too
			case ev.Type == "start" && ev.Status == "starting" && startAt == 0:
				startAt = ev.Timestamp
			case ev.Status == "started" && startAt > 0:
				boots = append(boots, time.Duration(ev.Timestamp-startAt)*time.Millisecond)
				startAt = -1 << 62
			}
		}
		if os.Getenv("KILN_BENCH_EVENTS") != "" {
			for _, ev := range evs {
				fmt.Fprintf(os.Stderr, "%s %d %s %s %s\n", m.ID, ev.Timestamp, ev.Type, ev.Status, ev.Message)
			}
		}
	}
	return stops, boots, nil
}

func mean(ds []time.Duration) time.Duration {
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return sum / time.Duration(max(len(ds), 1))
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func freeLocalAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "127.0.0.1:" + strconv.Itoa(20000+os.Getpid()%10000)
	}
	defer l.Close()
	return l.Addr().String()
}
