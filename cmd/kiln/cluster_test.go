package main_test

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/testutil"
)

// Two hosts share one real PostgreSQL: the second joins with the cluster secret the
// first made, and they share the admin token; a new machine goes to a host with room
// that is not cordoned, and pulls its image from the host that has it (over their
// mutual TLS link); the API answers on either host (calls about the other's machine
// are forwarded, carrying the caller's identity, not its token); no token or secret is
// in the database in clear, and a host without the secret does not start (see
// checkHostLinks); host ls shows both, and a killed host as down, with its machine
// neither answered for nor started elsewhere.
func TestTwoHostsOnePostgres(t *testing.T) {
	dsn := testutil.Postgres(t)
	start := func(name string, extra ...string) (*env, *kilnServer) {
		e := newEnv(t)
		srv := startServer(t, e, freeAddr(t), append([]string{"--db", dsn, "--host-name", name, "--proxy-listen", "off", "--network=false"}, extra...)...)
		return e, srv
	}
	ea, a := start("host-a") // it makes the cluster
	defer stopOnFailure(&a)
	eb, b := start("host-b", secretOf(t, ea)...)
	defer stopOnFailure(&b)
	ta, tb := readToken(t, filepath.Join(ea.dataDir, "admin-token")), readToken(t, filepath.Join(eb.dataDir, "admin-token"))
	if ta != tb {
		t.Fatalf("the hosts have different admin tokens")
	}
	ctx := context.Background()
	ca, cb := client.New(a.url, ta), client.New(b.url, tb)
	loadImage(t, a, imagetest.App(t), "localhost/app:1") // only host-a's registry has it
	ca.CreateApp(ctx, "web")
	run := func(c *client.Client, app string) api.Machine {
		m, err := c.CreateMachine(ctx, app, api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
			Init: api.Init{Cmd: []string{"sh", "-c", "while true; do sleep 1; done"}}}})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	m := run(ca, "web")
	if err := cb.Wait(ctx, "web", m.ID, "started", 90*time.Second); err != nil {
		t.Fatalf("waiting through the other host: %v\n%s", err, a.logs)
	}
	got, err := cb.GetMachine(ctx, "web", m.ID)
	if err != nil || got.Host != "host-a" {
		t.Fatalf("machine seen from host-b: %+v %v", got, err)
	}
	res, err := cb.Exec(ctx, "web", m.ID, []string{"busybox", "hostname"}, "", 30*time.Second)
	if err != nil || strings.TrimSpace(res.Stdout) != m.ID {
		t.Fatalf("exec through host-b: %+v %v", res, err)
	}
	// A streaming exec passes through host-b too: stdin in, output and exit status out.
	sess, err := cb.ExecStream(ctx, "web", m.ID, api.ExecRequest{Command: []string{"sh", "-c", "busybox cat; exit 4"}})
	if err != nil {
		t.Fatalf("streaming exec through host-b: %v", err)
	}
	var streamed strings.Builder
	if st, err := sess.Run(ctx, strings.NewReader("through b\n"), &streamed, io.Discard); err != nil || st.ExitCode != 4 || streamed.String() != "through b\n" {
		t.Fatalf("streaming exec through host-b: %+v %q %v", st, streamed.String(), err)
	}
	checkHostLinks(t, dsn, ea, a, b, "web", m.ID)
	out, _, _ := b.kiln("", "host", "ls")
	if !strings.Contains(out, "host-a") || !strings.Contains(out, "host-b") || strings.Count(out, " up ") != 2 {
		t.Fatalf("host ls:\n%s", out)
	}
	if !strings.Contains(out, "1/") {
		t.Errorf("host ls does not count host-a's machine:\n%s", out)
	}

	// With host-a cordoned (through host-b), a machine created through host-a goes to
	// host-b, which starts it with the image from host-a's registry.
	if _, errs, code := b.kiln("", "host", "cordon", "host-a"); code != 0 {
		t.Fatal(errs)
	}
	m2 := run(ca, "web")
	if err := cb.Wait(ctx, "web", m2.ID, "started", 90*time.Second); err != nil {
		t.Fatalf("the machine placed on host-b: %v\n%s", err, b.logs)
	}
	if got, _ := ca.GetMachine(ctx, "web", m2.ID); got.Host != "host-b" {
		t.Fatalf("created with host-a cordoned, the machine is on %q", got.Host)
	}
	b.kiln("", "host", "uncordon", "host-a")

	// Draining host-b (asked through host-a) moves its machine to host-a, running.
	out, errs, code := a.kiln("", "host", "drain", "host-b")
	if code != 0 || !strings.Contains(out, "moved  "+m2.ID+"  to host-a") {
		t.Fatalf("drain: %d %s %s", code, out, errs)
	}
	waitFor(t, func() bool {
		got, _ := ca.GetMachine(ctx, "web", m2.ID)
		return got.Host == "host-a" && got.State == "started"
	}, "the drained machine to run on host-a")
	b.kiln("", "host", "uncordon", "host-b")

	// host-a dies: host-b reports it down and does not take over its machine.
	a.stop(syscall.SIGKILL)
	waitFor(t, func() bool {
		out, _, _ := b.kiln("", "host", "ls")
		return strings.Contains(out, "host-a") && strings.Contains(out, "down")
	}, "host-a to show as down")
	if _, err := cb.Exec(ctx, "web", m.ID, []string{"true"}, "", 10*time.Second); err == nil || !strings.Contains(err.Error(), "host-a, which is down") {
		t.Errorf("a call about the dead host's machine: %v", err)
	}
	if procs := testutil.ProcessesNaming(filepath.Join(eb.dataDir, "vms")); len(procs) != 0 {
		t.Errorf("host-b runs %d VMs after host-a died, want none (its machine moved to host-a by the drain): %v", len(procs), procs)
	}
	// Clean up host-a's VM (its server is gone) and host-b's machine.
	testutil.KillProcessesNaming(ea.dataDir)
	os.RemoveAll(filepath.Join(ea.dataDir, "vms"))
	os.RemoveAll(filepath.Join(ea.dataDir, "locks"))
	a = nil
	b.stop(syscall.SIGTERM)
	b = nil
}

// Three hosts share a PostgreSQL and build the same project: a build goes to the host
// holding the project's cache; when that host is killed mid-build, another takes the
// build over once its heartbeat stops, with a fresh cache, and finishes it.
func TestBuildMovesWhenItsHostDies(t *testing.T) {
	dsn := testutil.Postgres(t)
	names := []string{"host-a", "host-b", "host-c"}
	servers := map[string]*kilnServer{}
	envs := map[string]*env{}
	for _, name := range names {
		e := newEnv(t)
		args := []string{"--db", dsn, "--host-name", name, "--proxy-listen", "off", "--network=false", "--build-cache-size", "4G", "--builder-memory", "1024"}
		if name != "host-a" {
			args = append(args, secretOf(t, envs["host-a"])...)
		}
		srv := startServer(t, e, freeAddr(t), args...)
		servers[name], envs[name] = srv, e
	}
	defer func() {
		for _, name := range names {
			srv := servers[name]
			stopOnFailure(&srv)
		}
	}()
	a := servers["host-a"]
	dir := loadBase(t, a)
	// Builds pull base images from their own host's registry: every host gets it.
	loadImage(t, servers["host-b"], imagetest.Base(t), "localhost/busybox:1")
	loadImage(t, servers["host-c"], imagetest.Base(t), "localhost/busybox:1")
	ctx := context.Background()
	clientOf := func(name string) *client.Client {
		return client.New(servers[name].url, readToken(t, filepath.Join(envs[name].dataDir, "admin-token")))
	}

	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte("FROM localhost/busybox:1\nRUN echo first > /first\n"), 0o644)
	if out, errs, code := a.kiln("", "build", dir, "--project", "shop"); code != 0 {
		t.Fatalf("first build: %s %s", out, errs)
	}
	bs, _ := clientOf("host-a").ListBuilds(ctx, "shop")
	cacheHost := bs[0].Host
	if servers[cacheHost] == nil {
		t.Fatalf("first build ran on %q", cacheHost)
	}
	var via string
	for _, n := range names {
		if n != cacheHost {
			via = n
			break
		}
	}

	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte("FROM localhost/busybox:1\nRUN echo slow-step-started; sleep 6; echo done > /done\n"), 0o644)
	out, errs, code := servers[via].kiln("", "build", dir, "--project", "shop", "--detach")
	if code != 0 {
		t.Fatalf("second build: %s", errs)
	}
	id := strings.TrimSpace(out)
	cl := clientOf(via)
	waitFor(t, func() bool {
		got, _ := cl.GetBuild(ctx, "shop", id)
		var seen bool
		cl.BuildLogs(ctx, "shop", id, false, func(l string) { seen = seen || strings.Contains(l, "slow-step-started") })
		return got.State == "running" && seen
	}, "the second build to run")
	if got, _ := cl.GetBuild(ctx, "shop", id); got.Host != cacheHost {
		t.Fatalf("the build runs on %s, not on %s which holds the project's cache", got.Host, cacheHost)
	}
	servers[cacheHost].stop(syscall.SIGKILL)
	testutil.KillProcessesNaming(envs[cacheHost].dataDir) // its builder goes with it
	os.RemoveAll(filepath.Join(envs[cacheHost].dataDir, "vms"))
	os.RemoveAll(filepath.Join(envs[cacheHost].dataDir, "locks"))
	servers[cacheHost] = nil
	var done api.Build
	var getErr error
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		done, getErr = cl.GetBuild(ctx, "shop", id)
		if done.State == "succeeded" || done.State == "failed" || done.State == "canceled" {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	log, _, _ := servers[via].kiln("", "build", "logs", id, "--project", "shop")
	if done.State != "succeeded" || done.Host == cacheHost || servers[done.Host] == nil || len(done.Retries) != 1 || !strings.Contains(done.Retries[0], "stopped heartbeating") {
		t.Fatalf("after the cache host died: %s on %s, retries %q, %s (%v)\n%s\n%s's log:\n%s", done.State, done.Host, done.Retries, done.Error, getErr, log, via, servers[via].logs)
	}
	if !strings.Contains(log, "is down: building on "+done.Host+" with a fresh cache") {
		t.Errorf("the build log does not say it moved:\n%s", log)
	}
	// Builders outlive their server; the one the build moved to goes when asked.
	if _, errs, code := servers[done.Host].kiln("", "build", "builder", "rm", "--project", "shop"); code != 0 {
		t.Errorf("build builder rm: %s", errs)
	}
	for _, n := range names {
		if servers[n] != nil {
			servers[n].stop(syscall.SIGTERM)
			servers[n] = nil
		}
	}
}

// forwarder carries TCP connections to a Unix socket until it is cut: the test's way of
// partitioning one host from the database.
type forwarder struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
	cut   bool
}

func newForwarder(t *testing.T, sock string) *forwarder {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &forwarder{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			if f.cut {
				f.mu.Unlock()
				c.Close()
				continue
			}
			u, err := net.Dial("unix", sock)
			if err != nil {
				f.mu.Unlock()
				c.Close()
				continue
			}
			f.conns = append(f.conns, c, u)
			f.mu.Unlock()
			go func() { io.Copy(u, c); u.Close() }()
			go func() { io.Copy(c, u); c.Close() }()
		}
	}()
	t.Cleanup(func() { ln.Close(); f.setCut(true) })
	return f
}

func (f *forwarder) port() string { return strconv.Itoa(f.ln.Addr().(*net.TCPAddr).Port) }

func (f *forwarder) setCut(cut bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cut = cut
	if cut {
		for _, c := range f.conns {
			c.Close()
		}
		f.conns = nil
	}
}

// A host cut off from PostgreSQL keeps its machine running and says so; the other host
// marks it down but never starts that machine itself; when the database is back, the
// first host heartbeats again and answers for its machine.
func TestPartitionFromPostgres(t *testing.T) {
	dsn := testutil.Postgres(t)
	fw := newForwarder(t, testutil.PostgresSocket())
	dbName := strings.TrimPrefix(dsn[:strings.Index(dsn, "?")], "postgres:///")
	viaTCP := "postgres://postgres@127.0.0.1:" + fw.port() + "/" + dbName + "?sslmode=disable"
	ea := newEnv(t)
	a := startServer(t, ea, freeAddr(t), "--db", viaTCP, "--host-name", "host-a", "--proxy-listen", "off", "--network=false")
	defer stopOnFailure(&a)
	eb := newEnv(t)
	b := startServer(t, eb, freeAddr(t), append([]string{"--db", dsn, "--host-name", "host-b", "--proxy-listen", "off", "--network=false"}, secretOf(t, ea)...)...)
	defer stopOnFailure(&b)
	ctx := context.Background()
	ca := client.New(a.url, readToken(t, filepath.Join(ea.dataDir, "admin-token")))
	cb := client.New(b.url, readToken(t, filepath.Join(eb.dataDir, "admin-token")))
	loadImage(t, a, imagetest.App(t), "localhost/app:1")
	ca.CreateApp(ctx, "web")
	m, err := ca.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
		Init: api.Init{Cmd: []string{"sh", "-c", "while true; do sleep 1; done"}}}})
	if err != nil || m.Host != "host-a" {
		t.Fatalf("machine: %+v %v", m, err)
	}
	if err := ca.Wait(ctx, "web", m.ID, "started", 90*time.Second); err != nil {
		t.Fatal(err)
	}

	fw.setCut(true)
	waitFor(t, func() bool { return strings.Contains(a.logs.String(), "the database does not answer") }, "host-a to notice the partition")
	waitFor(t, func() bool {
		out, _, _ := b.kiln("", "host", "ls")
		return strings.Contains(out, "host-a") && strings.Contains(out, "down")
	}, "host-b to mark host-a down")
	time.Sleep(3 * time.Second) // room for a wrong claim
	if procs := testutil.ProcessesNaming(filepath.Join(eb.dataDir, "vms")); len(procs) != 0 {
		t.Fatalf("host-b started a VM while host-a was cut off: %v", procs)
	}
	if procs := testutil.ProcessesNaming(filepath.Join(ea.dataDir, "vms")); len(procs) != 1 {
		t.Fatalf("host-a's machine did not keep running through the partition: %v", procs)
	}

	fw.setCut(false)
	waitFor(t, func() bool { return strings.Contains(a.logs.String(), "the database answers again") }, "host-a to reach the database again")
	waitFor(t, func() bool {
		out, _, _ := b.kiln("", "host", "ls")
		return strings.Count(out, " up ") == 2
	}, "host-a to be up again")
	res, err := cb.Exec(ctx, "web", m.ID, []string{"busybox", "true"}, "", 30*time.Second)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec through host-b after the partition: %+v %v", res, err)
	}
	a.kiln("", "machine", "destroy", "-f", m.ID)
	a.stop(syscall.SIGTERM)
	b.stop(syscall.SIGTERM)
	a, b = nil, nil
}
