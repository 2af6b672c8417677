package appconfig

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
)

func loadExample(t *testing.T) *Config {
	t.Helper()
	c, err := Load("testdata/fly.toml")
	if err != nil {
		t.Fatalf("Load(testdata/fly.toml): %v", err)
	}
	return c
}

// parse parses a fly.toml that must be valid.
func parse(t *testing.T, src string) *Config {
	t.Helper()
	c, err := Parse("fly.toml", []byte(src))
	if err != nil {
		t.Fatalf("Parse:\n%s\n: %v", src, err)
	}
	return c
}

// parseErr parses a fly.toml that must be refused with kind, its message holding each
// of want.
func parseErr(t *testing.T, src string, kind error, want ...string) error {
	t.Helper()
	_, err := Parse("fly.toml", []byte(src))
	if err == nil {
		t.Fatalf("Parse:\n%s\n: no error, want one saying %q", src, want)
	}
	if !errors.Is(err, kind) {
		t.Errorf("error %q is not %v", err, kind)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not say %q", err, w)
		}
	}
	return err
}

func machineConfig(t *testing.T, c *Config, group string) api.MachineConfig {
	t.Helper()
	mc, err := c.MachineConfig(group, "localhost/restless-fire-6276:deploy-1")
	if err != nil {
		t.Fatalf("MachineConfig(%s): %v", group, err)
	}
	return mc
}

func TestFlyDocExampleParses(t *testing.T) {
	c := loadExample(t)
	checks := []struct {
		what      string
		got, want any
	}{
		{"app", c.App, "restless-fire-6276"},
		{"groups", c.Groups(), []string{"web", "worker"}},
		{"default group", c.DefaultGroup(), "web"},
		{"kill_timeout (integer seconds)", c.KillTimeout, "30s"},
		{"build", *c.Build, Build{Dockerfile: "Dockerfile.prod", Target: "runtime", Ignorefile: ".dockerignore",
			Args: map[string]string{"RUBY_VERSION": "3.3.0", "BUNDLE_WITHOUT": "development:test"}}},
		{"env (a number is set as its text)", c.Env, map[string]string{"LOG_LEVEL": "debug", "RAILS_ENV": "production", "PORT": "8080"}},
		{"strategy", c.Strategy(), "rolling"},
		{"release_command", c.Deploy.ReleaseCommand, "bin/rails db:prepare"},
		{"wait_timeout", c.WaitTimeout(), 10 * time.Minute},
		{"max_unavailable of 4", c.MaxUnavailable(4), 2},
		{"mounts (a table)", c.Mounts[0].Source + " " + c.Mounts[0].Destination, "myapp_data /data"},
		{"project defaults to the app", c.Kiln.Project, "restless-fire-6276"},
		{"metrics are kept", len(c.Metrics), 1},
	}
	for _, ch := range checks {
		if !reflect.DeepEqual(ch.got, ch.want) {
			t.Errorf("%s = %#v, want %#v", ch.what, ch.got, ch.want)
		}
	}
	for _, want := range []string{
		"http_service.tls_options: kiln's proxy does not terminate TLS",
		"services[0].ports[1]: port 9443 uses tls, which kiln's proxy does not terminate: not served",
		"primary_region: kiln places machines by capacity, not by region",
		"metrics: kiln does not scrape apps' metrics",
	} {
		if !contains(c.Ignored, want) {
			t.Errorf("Ignored = %q, want it to list %q", c.Ignored, want)
		}
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestFlyDocExampleWebMachine(t *testing.T) {
	c := loadExample(t)
	mc := machineConfig(t, c, "web")
	yes := true
	want := api.MachineConfig{
		Image: "localhost/restless-fire-6276:deploy-1",
		Env: map[string]string{"LOG_LEVEL": "debug", "RAILS_ENV": "production", "PORT": "8080",
			"FLY_PROCESS_GROUP": "web"},
		Init:       api.Init{Cmd: []string{"bin/rails", "server", "-b", "0.0.0.0", "-p", "8080"}},
		Size:       "shared-cpu-2x",
		Guest:      api.Guest{MemoryMB: 1024},
		Mounts:     []api.Mount{{Volume: "myapp_data", Path: "/data"}},
		Restart:    api.Restart{Policy: "on-failure", MaxRetries: 5},
		Metadata:   map[string]string{"fly_process_group": "web"},
		StopConfig: &api.StopConfig{Signal: "SIGTERM", Timeout: "30s"},
		Services: []api.Service{{
			Protocol:           "tcp",
			InternalPort:       8080,
			Ports:              []api.ServicePort{{Port: 80, Handlers: []string{"http"}}},
			Autostop:           "stop",
			Autostart:          &yes,
			MinMachinesRunning: 1,
			Concurrency:        &api.Concurrency{Type: "requests", SoftLimit: 200, HardLimit: 250},
			Checks: []api.Check{
				{Type: "http", Interval: "30s", Timeout: "5s", GracePeriod: "10s", Path: "/up", Method: raw(`"GET"`)},
				// [checks.db] checks port 8080: it is attached to the service on it.
				{Type: "http", Interval: "15s", Timeout: "10s", GracePeriod: "30s", Path: "/db", Method: raw(`"GET"`), Port: raw(`8080`)},
			},
		}},
	}
	assertJSON(t, mc, want)
	if err := machine.Validate(&mc); err != nil {
		t.Fatalf("machine.Validate(web): %v", err)
	}
	if mc.Guest.CPUs != 2 || mc.Guest.MemoryMB != 1024 {
		t.Errorf("validated guest = %+v, want shared-cpu-2x's 2 CPUs with memory = \"1gb\"", mc.Guest)
	}
}

func TestFlyDocExampleWorkerMachine(t *testing.T) {
	c := loadExample(t)
	mc := machineConfig(t, c, "worker")
	no := false
	want := api.MachineConfig{
		Image: "localhost/restless-fire-6276:deploy-1",
		Env: map[string]string{"LOG_LEVEL": "debug", "RAILS_ENV": "production", "PORT": "8080",
			"FLY_PROCESS_GROUP": "worker"},
		Init:       api.Init{Cmd: []string{"bundle", "exec", "sidekiq", "--queue", "default critical"}},
		Size:       "shared-cpu-1x",
		Guest:      api.Guest{CPUs: 1, MemoryMB: 512, CPUKind: "shared"},
		Restart:    api.Restart{Policy: "always"},
		Metadata:   map[string]string{"fly_process_group": "worker"},
		StopConfig: &api.StopConfig{Signal: "SIGTERM", Timeout: "30s"},
		Services: []api.Service{{
			Protocol:     "tcp",
			InternalPort: 9090,
			// The tls port (9443) is not served: kiln's proxy terminates no TLS.
			Ports:       []api.ServicePort{{Port: 9090}},
			Autostop:    "off",
			Autostart:   &no,
			Concurrency: &api.Concurrency{Type: "connections", SoftLimit: 20, HardLimit: 25},
			Checks: []api.Check{
				// Integers are milliseconds, as Fly reads check durations.
				{Type: "tcp", Interval: "15s", Timeout: "2s", GracePeriod: "1s"},
				{Type: "http", Interval: "10s", Timeout: "2s", GracePeriod: "5s", Path: "/healthz",
					Method: raw(`"GET"`), Protocol: raw(`"http"`), Headers: raw(`{"X-Forwarded-Proto":"https"}`)},
				{Type: "tcp", Interval: "20s", Timeout: "2s", Port: raw(`9090`)},
			},
		}},
	}
	assertJSON(t, mc, want)
	if err := machine.Validate(&mc); err != nil {
		t.Fatalf("machine.Validate(worker): %v", err)
	}
}

func raw(s string) json.RawMessage { return json.RawMessage(s) }

func assertJSON(t *testing.T, got, want any) {
	t.Helper()
	g, _ := json.MarshalIndent(got, "", "  ")
	w, _ := json.MarshalIndent(want, "", "  ")
	if string(g) != string(w) {
		t.Errorf("got\n%s\nwant\n%s", g, w)
	}
}

func TestMachineConfigIsDeterministic(t *testing.T) {
	data, err := os.ReadFile("testdata/fly.toml")
	if err != nil {
		t.Fatal(err)
	}
	var first map[string]string
	for i := 0; i < 20; i++ {
		c, err := Parse("fly.toml", data)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, g := range c.Groups() {
			mc, err := c.MachineConfig(g, "localhost/app:1")
			if err != nil {
				t.Fatal(err)
			}
			b, _ := json.Marshal(mc)
			got[g] = string(b)
		}
		if first == nil {
			first = got
		} else if !reflect.DeepEqual(got, first) {
			t.Fatalf("parse %d gave other machine configs:\n%v\nthen\n%v", i, first, got)
		}
	}
}

func TestJSONRoundTrip(t *testing.T) {
	for _, src := range []string{"testdata/fly.toml", "testdata/kiln.toml"} {
		c, err := Load(src)
		if err != nil {
			t.Fatal(err)
		}
		b, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		var back Config
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(*c, back) {
			t.Errorf("%s: config changed through JSON:\n%+v\n%+v", src, *c, back)
		}
		for _, g := range c.Groups() {
			a, errA := c.MachineConfig(g, "i")
			b, errB := back.MachineConfig(g, "i")
			if (errA == nil) != (errB == nil) || !reflect.DeepEqual(a, b) {
				t.Errorf("%s: group %s's machine config changed through JSON", src, g)
			}
		}
	}
}

func TestKilnToml(t *testing.T) {
	c, err := Load("testdata/kiln.toml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Kiln.Project != "shop-builds" || !reflect.DeepEqual(c.Kiln.Counts, map[string]int{"app": 2}) {
		t.Errorf("kiln = %+v, want project shop-builds and counts app = 2", c.Kiln)
	}
	if got := c.Groups(); !reflect.DeepEqual(got, []string{"app"}) {
		t.Errorf("Groups() = %q, want [app] without [processes]", got)
	}
	mc := machineConfig(t, c, "app")
	if mc.Init.Cmd != nil {
		t.Errorf("init.cmd = %q: a group without a [processes] command runs the image's CMD", mc.Init.Cmd)
	}
	if mc.Size != "shared-cpu-1x" || mc.StopConfig.Signal != "SIGINT" || mc.StopConfig.Timeout != "5s" {
		t.Errorf("size %q, stop_config %+v: want Fly's defaults shared-cpu-1x, SIGINT and 5s", mc.Size, *mc.StopConfig)
	}
	if err := machine.Validate(&mc); err != nil {
		t.Fatalf("machine.Validate: %v", err)
	}
	parseErr(t, "app = \"a\"\n[kiln]\ncounts = { web = 1 }\n", errdefs.ErrInvalid, "kiln.counts.web", "not a process group")
	parseErr(t, "app = \"a\"\n[kiln]\nproject = \"Bad_Name\"\n", errdefs.ErrInvalid, "kiln.project")
}

func TestUnknownKeysAreNamed(t *testing.T) {
	err := parseErr(t, `
app = "a"
colour = "blue"
[http_service]
  internal_prot = 8080
  internal_port = 8080
  [[http_service.checks]]
    pth = "/"
[[services]]
  internal_port = 9000
  [[services.ports]]
    prot = 80
    port = 80
[mounts]
  source = "data"
  destination = "/data"
  sise = "1gb"
`, errdefs.ErrInvalid)
	want := `fly.toml: unknown keys "colour", "http_service.checks.pth", "http_service.internal_prot", "mounts.sise", "services.ports.prot": `
	if !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error %q\ndoes not start %q", err, want)
	}
	parseErr(t, "app = \"a\"\n[http_service]\ninternal_prot = 8080\n", errdefs.ErrInvalid, `fly.toml: unknown key "http_service.internal_prot"`)
	parseErr(t, "app = \"a\"\n[kiln]\nprojct = \"p\"\n", errdefs.ErrInvalid, `unknown key "kiln.projct"`)
	parseErr(t, "app = \"a\"\n[[vm]]\nsize = \"shared-cpu-1x\"\nmemroy = \"1gb\"\n", errdefs.ErrInvalid, `unknown key "vm.memroy"`)
}

func TestSyntaxErrorHasLineAndColumn(t *testing.T) {
	parseErr(t, "app = \"a\"\n\n[deploy]\nstrategy = \"rolling\n", errdefs.ErrInvalid, "fly.toml:4:")
	err := parseErr(t, "app = \"a\"\n[http_service]\n  internal_port = = 8080\n", errdefs.ErrInvalid)
	if !strings.HasPrefix(err.Error(), "fly.toml:3:") {
		t.Errorf("error %q does not start with fly.toml:3:", err)
	}
	// A value of the wrong type names its line, column and key too.
	parseErr(t, "app = \"a\"\n[http_service]\n  internal_port = \"8080\"\n", errdefs.ErrInvalid, "fly.toml:3:3: http_service.internal_port:")
	parseErr(t, "app = \"a\"\n[http_service]\ninternal_port = 80\nauto_stop_machines = 3\n", errdefs.ErrInvalid, "fly.toml:4:", "http_service.auto_stop_machines")
}

func TestStrategies(t *testing.T) {
	parseErr(t, "app = \"a\"\n[deploy]\nstrategy = \"blue-green\"\n", errdefs.ErrInvalid,
		`deploy.strategy "blue-green"`, "rolling, immediate, canary, bluegreen")
	for _, s := range Strategies {
		if got := parse(t, "app = \"a\"\n[deploy]\nstrategy = \""+s+"\"\n").Strategy(); got != s {
			t.Errorf("Strategy() = %q, want %q", got, s)
		}
	}
	if got := parse(t, `app = "a"`).Strategy(); got != "rolling" {
		t.Errorf("default Strategy() = %q, want rolling", got)
	}
}

func TestMountWithCanaryOrBluegreenIsRefused(t *testing.T) {
	for _, s := range []string{"canary", "bluegreen"} {
		parseErr(t, "app = \"a\"\n[deploy]\nstrategy = \""+s+"\"\n[mounts]\nsource = \"data\"\ndestination = \"/data\"\n",
			errdefs.ErrInvalid, s, "volumes cannot be attached to two machines at once", "use rolling or immediate")
	}
	parse(t, "app = \"a\"\n[deploy]\nstrategy = \"immediate\"\n[mounts]\nsource = \"data\"\ndestination = \"/data\"\n")
}

func TestInvalidEnvNameIsRefused(t *testing.T) {
	for _, name := range []string{`"1ST"`, `"MY-VAR"`, `"A B"`} {
		parseErr(t, "app = \"a\"\n[env]\n"+name+" = \"x\"\n", errdefs.ErrInvalid, "env key", "not a valid environment variable name")
	}
	parse(t, "app = \"a\"\n[env]\n_OK_1 = \"x\"\nlower = true\n")
}

func TestCheckDurationsInMilliseconds(t *testing.T) {
	c := parse(t, `
app = "a"
[[services]]
  internal_port = 8080
  [[services.ports]]
    port = 80
    handlers = ["http"]
  [[services.tcp_checks]]
    interval = 10000
    timeout = 1500
    grace_period = 0
  [[services.http_checks]]
    interval = "90s"
    timeout = 200
    path = "/"
`)
	checks := machineConfig(t, c, "app").Services[0].Checks
	want := []api.Check{
		{Type: "tcp", Interval: "10s", Timeout: "1.5s"},
		// Fly raises durations under a second to one and lowers those over a minute to one.
		{Type: "http", Interval: "1m0s", Timeout: "1s", Path: "/"},
	}
	assertJSON(t, checks, want)
	parseErr(t, "app = \"a\"\n[http_service]\ninternal_port = 80\n[[http_service.checks]]\ninterval = \"often\"\n", errdefs.ErrInvalid, "http_service.checks[0].interval")
}

func TestVMSizes(t *testing.T) {
	for _, tc := range []struct {
		vm         string
		size       string
		memory     int
		cpus       int
		validCPUs  int
		validMemMB int
	}{
		{`memory = "1gb"`, "shared-cpu-1x", 1024, 0, 1, 1024},
		{`memory = "512mb"`, "shared-cpu-1x", 512, 0, 1, 512},
		{`memory = "1.5GB"`, "shared-cpu-1x", 1536, 0, 1, 1536},
		{`memory = "2GiB"`, "shared-cpu-1x", 2048, 0, 1, 2048},
		{`memory = 768`, "shared-cpu-1x", 768, 0, 1, 768}, // a bare number is MB
		{`memory = "768"`, "shared-cpu-1x", 768, 0, 1, 768},
		{"size = \"shared-cpu-2x\"\nmemory = \"1gb\"\nmemory_mb = 2048", "shared-cpu-2x", 2048, 0, 2, 2048}, // memory_mb wins
		{"size = \"performance-1x\"\ncpus = 2", "performance-1x", 0, 2, 2, 2048},
	} {
		c := parse(t, "app = \"a\"\n[[vm]]\n"+tc.vm+"\n")
		mc := machineConfig(t, c, "app")
		if mc.Size != tc.size || mc.Guest.MemoryMB != tc.memory || mc.Guest.CPUs != tc.cpus {
			t.Errorf("[[vm]] %s: size %q, guest %+v; want size %q, memory_mb %d, cpus %d", tc.vm, mc.Size, mc.Guest, tc.size, tc.memory, tc.cpus)
		}
		if err := machine.Validate(&mc); err != nil {
			t.Errorf("[[vm]] %s: machine.Validate: %v", tc.vm, err)
		} else if mc.Guest.CPUs != tc.validCPUs || mc.Guest.MemoryMB != tc.validMemMB {
			t.Errorf("[[vm]] %s: validated guest %+v, want %d CPUs and %d MB", tc.vm, mc.Guest, tc.validCPUs, tc.validMemMB)
		}
	}
	parseErr(t, "app = \"a\"\n[[vm]]\nsize = \"shared-cpu-3x\"\n", errdefs.ErrInvalid, "vm[0].size", "shared-cpu-3x", "shared-cpu-2x")
	parseErr(t, "app = \"a\"\n[[vm]]\nmemory = \"lots\"\n", errdefs.ErrInvalid, `vm[0].memory "lots"`)
	parseErr(t, "app = \"a\"\n[[vm]]\ngpus = 1\n", errdefs.ErrNotImplemented, "vm.gpus", "no GPUs")
}

func TestVMForGroup(t *testing.T) {
	c := parse(t, `
app = "a"
[processes]
  web = "web"
  worker = "worker"
[[vm]]
  size = "shared-cpu-2x"
[[vm]]
  size = "shared-cpu-4x"
  processes = ["worker"]
`)
	if got := machineConfig(t, c, "web").Size; got != "shared-cpu-2x" {
		t.Errorf("web's size = %q, want the [[vm]] that names no group", got)
	}
	if got := machineConfig(t, c, "worker").Size; got != "shared-cpu-4x" {
		t.Errorf("worker's size = %q, want the [[vm]] that names it", got)
	}
}

func TestProcessCommandsAreSplitLikeAShell(t *testing.T) {
	for cmd, want := range map[string][]string{
		`bin/server --port 8080`:             {"bin/server", "--port", "8080"},
		`sh -c 'echo "hi there" && sleep 1'`: {"sh", "-c", `echo "hi there" && sleep 1`},
		`run "a b" c\ d 'e'"f"`:              {"run", "a b", "c d", "ef"},
		`  spaced    out  `:                  {"spaced", "out"},
		`python -c "print(\"quoted\")"`:      {"python", "-c", `print("quoted")`},
		`node server.js # comment stays out`: {"node", "server.js"},
	} {
		src, _ := json.Marshal(cmd) // a TOML basic string is written as JSON writes one
		c := parse(t, "app = \"a\"\n[processes]\nweb = "+string(src)+"\n")
		if got := machineConfig(t, c, "web").Init.Cmd; !reflect.DeepEqual(got, want) {
			t.Errorf("web = %s: init.cmd = %q, want %q", src, got, want)
		}
	}
	parseErr(t, "app = \"a\"\n[processes]\nweb = \"run 'unterminated\"\n", errdefs.ErrInvalid, "processes.web", "quote it as a shell would")
}

func TestMaxUnavailable(t *testing.T) {
	for _, tc := range []struct {
		value string // as in [deploy]; "" leaves it out
		n     int
		want  int
	}{
		{"", 10, 4},   // Fly's 0.33, rounded up
		{"", 3, 1},    // ceil(0.99)
		{"", 1, 1},    // at least one
		{"0.5", 4, 2}, // a fraction
		{"0.5", 5, 3},
		{"0.01", 10, 1}, // at least one
		{"2", 10, 2},    // a count
		{"2", 1, 1},     // at most n
		{"1", 5, 1},
	} {
		src := "app = \"a\"\n"
		if tc.value != "" {
			src += "[deploy]\nmax_unavailable = " + tc.value + "\n"
		}
		if got := parse(t, src).MaxUnavailable(tc.n); got != tc.want {
			t.Errorf("max_unavailable %q, n = %d: MaxUnavailable = %d, want %d", tc.value, tc.n, got, tc.want)
		}
	}
	for _, bad := range []string{"0", "-1", "1.5"} {
		parseErr(t, "app = \"a\"\n[deploy]\nmax_unavailable = "+bad+"\n", errdefs.ErrInvalid, "deploy.max_unavailable")
	}
}

func TestDurationsInSeconds(t *testing.T) {
	c := parse(t, "app = \"a\"\nkill_timeout = 12\n[deploy]\nwait_timeout = 90\nrelease_command_timeout = \"2m\"\n")
	if c.KillTimeout != "12s" || c.WaitTimeout() != 90*time.Second || c.ReleaseCommandTimeout() != 2*time.Minute {
		t.Errorf("kill_timeout %q, wait %s, release %s: want 12s, 1m30s, 2m", c.KillTimeout, c.WaitTimeout(), c.ReleaseCommandTimeout())
	}
	if d := parse(t, `app = "a"`); d.WaitTimeout() != 5*time.Minute {
		t.Errorf("default WaitTimeout = %s, want Fly's 5m", d.WaitTimeout())
	}
	parseErr(t, "app = \"a\"\n[deploy]\nwait_timeout = \"soon\"\n", errdefs.ErrInvalid, "deploy.wait_timeout")
	parseErr(t, "app = \"a\"\nkill_timeout = \"10m\"\n", errdefs.ErrInvalid, "kill_timeout", "over the limit")
	parseErr(t, "app = \"a\"\nkill_signal = \"SIGNOPE\"\n", errdefs.ErrInvalid, "kill_signal")
}

func TestAppName(t *testing.T) {
	parseErr(t, "primary_region = \"ord\"\n", errdefs.ErrInvalid, "app is required")
	parseErr(t, "app = \"My_App\"\n", errdefs.ErrInvalid, `app "My_App"`, "lowercase")
}

func TestTopLevelChecks(t *testing.T) {
	// A check without a port checks the http_service's, as in Fly.
	c := parse(t, `
app = "a"
[http_service]
  internal_port = 3000
[checks.alive]
  type = "http"
  path = "/alive"
  interval = 5000
`)
	got := machineConfig(t, c, "app").Services[0].Checks
	assertJSON(t, got, []api.Check{{Type: "http", Interval: "5s", Path: "/alive"}})

	parseErr(t, `
app = "a"
[http_service]
  internal_port = 3000
[checks.metrics]
  type = "tcp"
  port = 9999
`, errdefs.ErrInvalid, "checks.metrics", "port 9999", "no service's internal_port", "kiln checks services' ports only")
	parseErr(t, "app = \"a\"\n[checks.x]\ntype = \"tcp\"\n", errdefs.ErrInvalid, "checks.x has no port")
	parseErr(t, "app = \"a\"\n[http_service]\ninternal_port = 80\n[checks.x]\ntype = \"grpc\"\n", errdefs.ErrInvalid, `checks.x.type "grpc"`)
	parseErr(t, "app = \"a\"\n[http_service]\ninternal_port = 80\n[checks.x]\ntype = \"tcp\"\ninterval = \"1s\"\n", errdefs.ErrInvalid, "checks.x.interval", "minimum")
}

func TestProcessesMustExist(t *testing.T) {
	const base = "app = \"a\"\n[processes]\nweb = \"w\"\n"
	for src, key := range map[string]string{
		base + "[http_service]\ninternal_port = 80\nprocesses = [\"wbe\"]\n":             "http_service.processes",
		base + "[[vm]]\nprocesses = [\"wbe\"]\n":                                         "vm[0].processes",
		base + "[mounts]\nsource = \"d\"\ndestination = \"/d\"\nprocesses = [\"wbe\"]\n": "mounts.processes",
		base + "[[restart]]\npolicy = \"always\"\nprocesses = [\"wbe\"]\n":               "restart[0].processes",
		base + "[checks.c]\ntype = \"tcp\"\nport = 80\nprocesses = [\"wbe\"]\n":          "checks.c.processes",
		"app = \"a\"\n[http_service]\ninternal_port = 80\nprocesses = [\"web\"]\n":       "http_service.processes",
	} {
		parseErr(t, src, errdefs.ErrInvalid, key, "not a process group")
	}
	// Fly's rule: with [processes], every service says which groups it serves.
	parseErr(t, base+"[http_service]\ninternal_port = 80\n", errdefs.ErrInvalid, "http_service has no processes", `processes = ["web"]`)
}

func TestRestartPolicies(t *testing.T) {
	c := parse(t, "app = \"a\"\n[[restart]]\npolicy = \"never\"\n")
	if got := machineConfig(t, c, "app").Restart; got.Policy != "no" {
		t.Errorf("policy never: restart = %+v, want the machine API's \"no\"", got)
	}
	parseErr(t, "app = \"a\"\n[[restart]]\npolicy = \"sometimes\"\n", errdefs.ErrInvalid, "restart[0].policy", "never, always or on-failure")
}

func TestMountsAsArrayOfTables(t *testing.T) {
	c := parse(t, `
app = "a"
[processes]
  web = "w"
  db = "d"
[[mounts]]
  source = "web_data"
  destination = "/data"
  initial_size = 10
  processes = ["web"]
[[mounts]]
  source = "pg"
  destination = "/var/lib/postgresql"
  initial_size = "500gb"
  processes = ["db"]
`)
	if got := machineConfig(t, c, "db").Mounts; !reflect.DeepEqual(got, []api.Mount{{Volume: "pg", Path: "/var/lib/postgresql"}}) {
		t.Errorf("db's mounts = %+v", got)
	}
	if gb, _ := c.Mounts[0].InitialSize.GB(); gb != 10 {
		t.Errorf("initial_size = 10: %d GB, want 10 (a bare number is GB)", gb)
	}
	parseErr(t, "app = \"a\"\n[mounts]\nsource = \"d\"\ndestination = \"/d\"\ninitial_size = \"500mb\"\n", errdefs.ErrInvalid, "mounts.initial_size", "at least 1 GB")
	parseErr(t, "app = \"a\"\n[mounts]\nsource = \"d\"\ndestination = \"data\"\n", errdefs.ErrInvalid, "mounts.destination")
	parseErr(t, "app = \"a\"\n[[mounts]]\nsource = \"d\"\ndestination = \"/d\"\n[[mounts]]\nsource = \"e\"\ndestination = \"/e\"\n", errdefs.ErrInvalid, "more than one mount")
}

// [[files]] become the group's config.files: raw_value and secret_name as given,
// local_path once kiln deploy has sent its contents.
func TestFilesBecomeMachineFiles(t *testing.T) {
	c := parse(t, `
app = "a"
[processes]
  web = "w"
  worker = "k"
[[files]]
  guest_path = "/etc/app.conf"
  raw_value = "eD0xCg=="
  processes = ["worker"]
[[files]]
  guest_path = "/etc/key.pem"
  secret_name = "TLS_KEY"
  processes = ["worker"]
[[files]]
  guest_path = "/etc/local.conf"
  local_path = "conf/local.conf"
  processes = ["worker"]
`)
	if cfg := machineConfig(t, c, "web"); len(cfg.Files) != 0 {
		t.Fatalf("web got files meant for worker: %+v", cfg.Files)
	}
	if _, err := c.MachineConfig("worker", "i"); err == nil || !strings.Contains(err.Error(), "conf/local.conf") {
		t.Fatalf("a local_path not sent: %v", err)
	}
	if err := c.InlineLocalFiles(map[string]string{}); err == nil || !strings.Contains(err.Error(), "conf/local.conf") {
		t.Fatalf("inlining without the contents: %v", err)
	}
	if err := c.InlineLocalFiles(map[string]string{"conf/local.conf": "bG9jYWwK"}); err != nil {
		t.Fatal(err)
	}
	cfg := machineConfig(t, c, "worker")
	if len(cfg.Files) != 3 || *cfg.Files[0].RawValue != "eD0xCg==" || *cfg.Files[1].SecretName != "TLS_KEY" || *cfg.Files[2].RawValue != "bG9jYWwK" {
		t.Fatalf("worker's files: %+v", cfg.Files)
	}
	parseErr(t, "app = \"a\"\n[[files]]\nguest_path = \"/f\"\nraw_value = \"x\"\nsecret_name = \"S\"\n", errdefs.ErrInvalid, "files[0]", "exactly one")
	parseErr(t, "app = \"a\"\n[[files]]\nguest_path = \"f\"\nraw_value = \"x\"\n", errdefs.ErrInvalid, "files[0].guest_path")
}

func TestUnsupportedFeaturesAreRefusedByName(t *testing.T) {
	for src, want := range map[string]string{
		"[build]\nbuilder = \"paketobuildpacks/builder:base\"\n":                                       "build.builder",
		"[build]\nbuildpacks = [\"gcr.io/paketo-buildpacks/nodejs\"]\n":                                "build.buildpacks",
		"[[statics]]\nguest_path = \"/app/public\"\nurl_prefix = \"/\"\n":                              "statics",
		"[[services]]\ninternal_port = 53\nprotocol = \"udp\"\n":                                       "services[0].protocol udp",
		"[[services]]\ninternal_port = 80\n[[services.ports]]\nstart_port = 8000\nend_port = 8010\n":   "services.ports.start_port",
		"[[services]]\ninternal_port = 80\n[[services.ports]]\nport = 5432\nhandlers = [\"pg_tls\"]\n": "pg_tls",
	} {
		parseErr(t, "app = \"a\"\n"+src, errdefs.ErrNotImplemented, want)
	}
}

func TestMachineConfigOfUnknownGroup(t *testing.T) {
	_, err := loadExample(t).MachineConfig("app", "i")
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "web, worker") {
		t.Errorf("MachineConfig(app) = %v, want ErrNotFound listing web, worker", err)
	}
}

func TestReleaseMachineConfig(t *testing.T) {
	c := loadExample(t)
	mc, err := c.ReleaseMachineConfig("localhost/app:1")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(mc.Init.Cmd, []string{"bin/rails", "db:prepare"}) || mc.Env["RELEASE_COMMAND"] != "1" ||
		!mc.AutoDestroy || mc.Restart.Policy != "no" || len(mc.Services) != 0 || len(mc.Mounts) != 0 || mc.Size != "shared-cpu-2x" {
		t.Errorf("release machine config = %+v", mc)
	}
	if err := machine.Validate(&mc); err != nil {
		t.Errorf("machine.Validate: %v", err)
	}
}

func TestLoadCapsTheFileSize(t *testing.T) {
	p := filepath.Join(t.TempDir(), "fly.toml")
	big := "app = \"a\"\n" + strings.Repeat("# padding\n", MaxFileBytes/10+1)
	if err := os.WriteFile(p, []byte(big), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Load(p)
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "1024 KiB") {
		t.Errorf("Load of %d bytes = %v, want the limit named", len(big), err)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "none.toml")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Load of a missing file = %v, want ErrNotFound", err)
	}
}

func TestFlyV1File(t *testing.T) {
	c, err := Load("testdata/fly-v1.toml")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Groups(); !reflect.DeepEqual(got, []string{"app"}) {
		t.Errorf("Groups() = %q: processes = [] is no process groups", got)
	}
	mc := machineConfig(t, c, "app")
	if got := mc.Services[0].Ports; !reflect.DeepEqual(got, []api.ServicePort{{Port: 80, Handlers: []string{"http"}}}) {
		t.Errorf("ports = %+v, want port 80 only", got)
	}
	if err := machine.Validate(&mc); err != nil {
		t.Fatal(err)
	}
	c = parse(t, "app = \"a\"\n[[processes]]\nname = \"web\"\ncommand = \"serve --port 80\"\n")
	if got := machineConfig(t, c, "web").Init.Cmd; !reflect.DeepEqual(got, []string{"serve", "--port", "80"}) {
		t.Errorf("[[processes]] name/command: init.cmd = %q", got)
	}
}

// What one config may ask is bounded: groups, counts, timeouts; a huge max_unavailable
// means all the machines.
func TestBounds(t *testing.T) {
	var procs strings.Builder
	procs.WriteString("app = \"shop\"\n[processes]\n")
	for i := 0; i <= MaxGroups; i++ {
		fmt.Fprintf(&procs, "  g%d = \"sleep 1\"\n", i)
	}
	for name, toml := range map[string]string{
		"groups":       procs.String(),
		"count":        "app = \"shop\"\n[kiln]\n  counts = { app = 100000000 }\n",
		"wait_timeout": "app = \"shop\"\n[deploy]\n  wait_timeout = \"2000000h\"\n",
	} {
		if _, err := Parse("fly.toml", []byte(toml)); err == nil || !strings.Contains(err.Error(), "limit") && !strings.Contains(err.Error(), "give 0 to") {
			t.Errorf("%s over its bound: %v", name, err)
		}
	}
	c, err := Parse("fly.toml", []byte("app = \"shop\"\n[deploy]\n  max_unavailable = 1e300\n"))
	if err != nil {
		t.Fatal(err)
	}
	if n := c.MaxUnavailable(7); n != 7 {
		t.Fatalf("max_unavailable 1e300 of 7 machines: %d, want 7", n)
	}
}
