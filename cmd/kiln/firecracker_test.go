package main_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/testutil"
)

// firecrackerEnv points e's kiln at a Firecracker and its jailer. Where
// KILN_TEST_FIRECRACKER names a real firecracker (and KILN_TEST_JAILER its jailer; `make
// test-firecracker`), those run on the host's KVM. Elsewhere fake-firecracker stands in
// for both: fctest's API server, which enforces Firecracker's API and the jailer's
// layout, with real guests under QEMU behind it; KILN_ACCEL=kvm tells kiln the host has
// the KVM the fake does not need.
func firecrackerEnv(t *testing.T, e *env) (jailBin string) {
	t.Helper()
	if real := os.Getenv("KILN_TEST_FIRECRACKER"); real != "" {
		jailer := os.Getenv("KILN_TEST_JAILER")
		if jailer == "" {
			t.Fatal("KILN_TEST_FIRECRACKER is set without KILN_TEST_JAILER: kiln runs Firecracker only under its jailer")
		}
		e.extra = append(e.extra, "KILN_FIRECRACKER="+real, "KILN_JAILER="+jailer)
		return real
	}
	bin := testutil.GoBuild(t, "./internal/vmm/firecracker/fctest/fake-firecracker", testutil.TempDir(t))
	e.extra = append(e.extra, "KILN_FIRECRACKER="+bin, "KILN_JAILER="+bin, "KILN_ACCEL=kvm")
	return bin
}

// TestServerEndToEndFirecracker runs the server with --vmm firecracker: machines on a
// volume behind the proxy, suspend and resume, the private network, and a build in a
// builder VM, every VM jailed. Nothing of the jails is left after.
func TestServerEndToEndFirecracker(t *testing.T) {
	if os.Getenv("KILN_TEST_IN_NETNS") == "" {
		t.Fatal("this test must run in its own network namespace (TestMain arranges it)")
	}
	e := newEnv(t)
	fcBin := firecrackerEnv(t, e)
	jails := filepath.Join(e.dataDir, "jail", filepath.Base(fcBin))
	addr, proxyAddr := freeAddr(t), freeAddr(t)
	srv := startServer(t, e, addr, "--vmm", "firecracker", "--proxy-listen", proxyAddr,
		"--build-cache-size", "4G", "--builder-memory", "1024")
	defer stopOnFailure(&srv)
	if !strings.Contains(srv.logs.String(), "vmm firecracker") {
		t.Fatalf("the server does not say it runs on firecracker:\n%s", srv.logs)
	}
	ctx := context.Background()
	cl := client.New(srv.url, readToken(t, filepath.Join(e.dataDir, "admin-token")))
	loadImage(t, srv, imagetest.App(t), "localhost/app:1")

	// A web server on a volume, behind the proxy.
	if _, errs, code := srv.kiln("", "volume", "create", "data", "--app", "web", "--size", "1G"); code != 0 {
		t.Fatalf("volume create: %s", errs)
	}
	httpd := "echo hello from $(busybox hostname) > /data/index.html; exec busybox httpd -f -p 8080 -h /data"
	out, errs, code := srv.kiln("", "machine", "run", "localhost/app:1", "--app", "web", "--volume", "data:/data",
		"--port", "80:8080/http", "--", "sh", "-c", httpd)
	if code != 0 {
		t.Fatalf("machine run: %s\n%s", errs, srv.logs)
	}
	web := strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:])
	// Its VMM is jailed: a jail of its own, handed to an unprivileged user.
	ents, _ := os.ReadDir(jails)
	if len(ents) != 1 {
		t.Fatalf("%d jails in %s for one machine", len(ents), jails)
	}
	root := filepath.Join(jails, ents[0].Name(), "root")
	fi, err := os.Stat(root)
	if err != nil {
		t.Fatalf("machine %s has no jail: %v", web, err)
	}
	if uid := statUID(fi); uid <= 0 {
		t.Errorf("the jail %s belongs to %d; the jailer hands it to the VM's user", root, uid)
	}
	webGet := func() (int, string) {
		code, body, _ := proxyGet(t, srv, proxyAddr, "web.kiln.internal")
		return code, body
	}
	// "started" means the workload runs, not that httpd listens yet.
	waitFor(t, func() bool {
		code, body := webGet()
		return code == 200 && strings.Contains(body, "hello from "+web)
	}, "the web machine to answer through the proxy")

	// The private network: another machine of the app reaches it at its private address.
	peer := createSleeper(t, cl, "web")
	if err := cl.Wait(ctx, "web", peer.ID, "started", 90*time.Second); err != nil {
		t.Fatalf("%s: %v\n%s", peer.ID, err, srv.logs)
	}
	webM, _ := cl.GetMachine(ctx, "web", web)
	res, err := cl.Exec(ctx, "web", peer.ID, []string{"sh", "-c",
		"for i in 1 2 3 4 5 6 7 8 9 10; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 " + webM.PrivateIP + " 8080 && exit 0; sleep 0.5; done; exit 1"}, "", 60*time.Second)
	if err != nil || res.ExitCode != 0 || !strings.Contains(res.Stdout, "hello from "+web) {
		t.Fatalf("machine to machine over the private network: %+v %v", res, err)
	}

	// Suspend and resume: the same boot, its memory intact.
	before, err := cl.Exec(ctx, "web", web, []string{"sh", "-c", "cat /proc/sys/kernel/random/boot_id; echo kept > /dev/shm/in-memory"}, "", 30*time.Second)
	if err != nil || before.ExitCode != 0 {
		t.Fatalf("exec before suspend: %+v %v", before, err)
	}
	if _, errs, code := srv.kiln("", "machine", "suspend", web); code != 0 {
		t.Fatalf("suspend: %s\n%s", errs, srv.logs)
	}
	if err := cl.Wait(ctx, "web", web, "suspended", 60*time.Second); err != nil {
		t.Fatalf("wait suspended: %v\n%s", err, srv.logs)
	}
	if _, errs, code := srv.kiln("", "machine", "start", web); code != 0 {
		t.Fatalf("start the suspended machine: %s\n%s", errs, srv.logs)
	}
	if err := cl.Wait(ctx, "web", web, "started", 90*time.Second); err != nil {
		t.Fatalf("wait resumed: %v\n%s", err, srv.logs)
	}
	after, err := cl.Exec(ctx, "web", web, []string{"sh", "-c", "cat /proc/sys/kernel/random/boot_id; cat /dev/shm/in-memory"}, "", 30*time.Second)
	if err != nil || after.Stdout != strings.TrimSuffix(before.Stdout, "\n")+"\nkept\n" && after.Stdout != before.Stdout+"kept\n" {
		t.Fatalf("after the resume: %+v %v; want boot %q and the file kept in memory", after, err, before.Stdout)
	}
	if evs, _ := cl.Events(ctx, "web", web); !hasEvent(evs, "resume") || hasEvent(evs, "resume-failed-cold-boot") {
		t.Errorf("the start was not a resume: %+v", evs)
	}
	// The volume outlives a stop and a cold start.
	if _, errs, code := srv.kiln("", "machine", "stop", web); code != 0 {
		t.Fatalf("stop: %s", errs)
	}
	if err := cl.Wait(ctx, "web", web, "stopped", 60*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(root); err == nil {
		t.Errorf("the jail of stopped machine %s is still there", web)
	}
	// Its TAP device stays for its next start, but no longer belongs to the user its VM
	// ran as (the next VM given that user must not attach to it): only the running
	// peer's TAP device has an owner.
	owned := 0
	links, _ := netlink.LinkList()
	for _, l := range links {
		if tap, ok := l.(*netlink.Tuntap); ok && strings.HasPrefix(tap.Name, "kt") && tap.Owner != 0 {
			owned++
		}
	}
	if owned != 1 {
		t.Errorf("%d TAP devices belong to a VM's user with one VM running", owned)
	}
	if _, errs, code := srv.kiln("", "machine", "start", web); code != 0 {
		t.Fatalf("start: %s", errs)
	}
	if err := cl.Wait(ctx, "web", web, "started", 90*time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		code, body := webGet()
		return code == 200 && strings.Contains(body, "hello from "+web)
	}, "the web machine to answer through the proxy after a cold start")

	// A build in the project's builder VM, under Firecracker too.
	dir := loadBase(t, srv)
	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte("FROM localhost/busybox:1\nRUN echo built-on-firecracker > /out\nCMD [\"cat\", \"/out\"]\n"), 0o644)
	out, errs, code = srv.kiln("", "build", dir, "--project", "shop", "--tag", "localhost/shop/fc:1")
	if code != 0 || !strings.Contains(out, "localhost/shop/fc:1") {
		t.Fatalf("kiln build: exit %d\n%s\n%s\n%s", code, out, errs, srv.logs)
	}
	builders, _ := os.ReadDir(jails)
	jailed := map[string]bool{}
	for _, b := range builders {
		jailed[b.Name()] = true
	}
	ms, _ := cl.ListMachines(ctx, "web")
	if len(builders) != len(ms)+1 {
		t.Errorf("%d jails for %d machines and a builder: %v", len(builders), len(ms), jailed)
	}
	out, errs, code = srv.kiln("", "machine", "run", "localhost/shop/fc:1", "--app", "shop")
	if code != 0 {
		t.Fatalf("run the built image: %s", errs)
	}
	built := strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:])
	waitFor(t, func() bool {
		out, _, _ := srv.kiln("", "logs", built)
		return strings.Contains(out, "built-on-firecracker")
	}, "the built image's output")

	// kill -9 of the server: the jailed VMs and their console loggers keep running, and
	// the restarted server adopts them.
	if res, err := cl.Exec(ctx, "web", web, []string{"sh", "-c", "echo kept > /dev/shm/in-memory"}, "", 30*time.Second); err != nil || res.ExitCode != 0 {
		t.Fatalf("exec: %+v %v", res, err)
	}
	srv.stop(syscall.SIGKILL)
	srv = startServer(t, e, addr, "--vmm", "firecracker", "--proxy-listen", proxyAddr,
		"--build-cache-size", "4G", "--builder-memory", "1024")
	if !strings.Contains(srv.logs.String(), "re-adopted") {
		t.Errorf("the restart did not say it adopted the running VMs:\n%s", srv.logs)
	}
	loggers := 0
	for _, p := range testutil.ProcessesNaming(e.dataDir) {
		if strings.Contains(p, " console-log ") {
			loggers++
		}
	}
	if ms, _ := cl.ListMachines(ctx, "web"); loggers < len(ms) {
		t.Errorf("%d console loggers for %d running machines after the restart", loggers, len(ms))
	}
	res, err = cl.Exec(ctx, "web", web, []string{"sh", "-c", "cat /dev/shm/in-memory"}, "", 30*time.Second)
	if err != nil || res.Stdout != "kept\n" {
		t.Fatalf("exec after the restart: %+v %v\n%s", res, err, srv.logs)
	}
	if code, body := webGet(); code != 200 || !strings.Contains(body, "hello from "+web) {
		t.Fatalf("proxied request after the restart: %d %q", code, body)
	}

	if _, errs, code := srv.kiln("", "build", "builder", "rm", "--project", "shop"); code != 0 {
		t.Errorf("build builder rm: %s", errs)
	}
	for _, m := range []api.Machine{{ID: web}, {ID: peer.ID}, {ID: built}} {
		if _, errs, code := srv.kiln("", "machine", "destroy", "-f", m.ID); code != 0 {
			t.Fatalf("destroy %s: %s", m.ID, errs)
		}
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
	// The builder stops with the server; no jail outlives its VM.
	if ents, _ := os.ReadDir(jails); len(ents) > 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("jails left behind: %v", names)
	}
}

// TestServerRefusesFirecrackerWithoutKVM: with a firecracker binary but no working KVM
// (this host's), --vmm firecracker refuses to start, naming the reason, and auto runs on
// QEMU, saying why; without the binary, --vmm firecracker names it.
func TestServerRefusesFirecrackerWithoutKVM(t *testing.T) {
	e := newEnv(t)
	bin := testutil.GoBuild(t, "./internal/vmm/firecracker/fctest/fake-firecracker", testutil.TempDir(t))
	e.extra = append(e.extra, "KILN_FIRECRACKER="+bin, "KILN_JAILER="+bin, "KILN_ACCEL=tcg")
	_, errs, code := e.run("", "server", "--listen", freeAddr(t), "--vmm", "firecracker", "--network=false", "--proxy-listen", "off")
	if code != 2 || !strings.Contains(errs, "--vmm firecracker needs a working KVM, and this host has none") || !strings.Contains(errs, "--vmm qemu") {
		t.Errorf("--vmm firecracker without KVM: exit %d, %s", code, errs)
	}
	srv := startServer(t, e, freeAddr(t), "--vmm", "auto", "--network=false", "--proxy-listen", "off")
	srv.stop(syscall.SIGTERM)
	if logs := srv.logs.String(); !strings.Contains(logs, "--vmm auto chose qemu: --vmm firecracker needs a working KVM") || !strings.Contains(logs, "vmm qemu") {
		t.Errorf("--vmm auto without KVM does not say it chose qemu, and why:\n%s", logs)
	}
	// Set in the server's config file, the same.
	e.extra = []string{"KILN_FIRECRACKER=/nonexistent/firecracker", "KILN_JAILER=/nonexistent/jailer", "KILN_ACCEL=kvm"}
	cfg := filepath.Join(e.dataDir, "server.toml")
	os.WriteFile(cfg, []byte("vmm = \"firecracker\"\nnetwork = false\nproxy-listen = \"off\"\n"), 0o644)
	_, errs, code = e.run("", "server", "--listen", freeAddr(t), "--config", cfg)
	if code != 2 || !strings.Contains(errs, "the firecracker binary (/nonexistent/firecracker) is not on this host") {
		t.Errorf("--vmm firecracker without its binary: exit %d, %s", code, errs)
	}
}

func statUID(fi os.FileInfo) int {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid)
	}
	return -1
}
