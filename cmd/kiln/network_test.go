package main_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/image/imagetest"
)

// proxyGet sends GET / for host through the proxy at addr and returns the status, the
// body and the machine that answered (Kiln-Machine).
func proxyGet(t *testing.T, srv *kilnServer, addr, host string) (int, string, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+addr+"/", nil)
	req.Host = host
	resp, err := (&http.Client{Timeout: 90 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("proxy: %v\n%s", err, srv.logs)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header.Get("Kiln-Machine")
}

// kilnDevices lists the bridges and TAP devices kiln made in the test's namespace.
func kilnDevices(t *testing.T) []string {
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range links {
		if n := l.Attrs().Name; strings.HasPrefix(n, "kb") || strings.HasPrefix(n, "kt") {
			out = append(out, n)
		}
	}
	return out
}

func kilnTables(t *testing.T) string {
	out, err := exec.Command("nft", "list", "tables").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list tables: %v %s", err, out)
	}
	var kiln []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "kiln_") {
			kiln = append(kiln, l)
		}
	}
	return strings.Join(kiln, "; ")
}

const (
	egressAddr  = "192.0.2.9" // the host's second address on the outside link: machines' source
	outsideAddr = "192.0.2.2" // a listener in another namespace standing for the Internet
)

// outside is a second network namespace joined to the tests' one by a veth pair. It
// stands for every network beyond the host: the internet, private ranges, a cloud's
// metadata service. Nothing in it reaches further.
type outside struct {
	home, ns netns.NsHandle
	h        *netlink.Handle // in ns
	host     netlink.Link    // the tests' end of the veth pair
}

func newOutside(t *testing.T) *outside {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	home, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	out, err := netns.New() // this thread is now in the new namespace
	if err != nil {
		t.Fatal(err)
	}
	if lo, err := netlink.LinkByName("lo"); err == nil {
		netlink.LinkSetUp(lo)
	}
	netns.Set(home)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "kout0"}, PeerName: "kout1"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	peer, _ := netlink.LinkByName("kout1")
	if err := netlink.LinkSetNsFd(peer, int(out)); err != nil {
		t.Fatal(err)
	}
	host, _ := netlink.LinkByName("kout0")
	for _, a := range []string{"192.0.2.1/24", egressAddr + "/24"} {
		ip, _ := netlink.ParseAddr(a)
		if err := netlink.AddrAdd(host, ip); err != nil {
			t.Fatal(err)
		}
	}
	netlink.LinkSetUp(host)
	h, err := netlink.NewHandleAt(out)
	if err != nil {
		t.Fatal(err)
	}
	inner, err := h.LinkByName("kout1")
	if err != nil {
		t.Fatal(err)
	}
	ip, _ := netlink.ParseAddr(outsideAddr + "/24")
	h.AddrAdd(inner, ip)
	h.LinkSetUp(inner)
	// No route back to the machines' network: only translated traffic can be answered.
	t.Cleanup(func() {
		h.Close()
		out.Close()
		home.Close()
		netlink.LinkDel(host)
	})
	return &outside{home: home, ns: out, h: h, host: host}
}

// listen serves TCP on addr:9000 in the outside namespace, routed there from the tests'
// one. Each connection is answered "hello from ADDR" and its source address reported.
func (o *outside) listen(t *testing.T, addr string) <-chan string {
	t.Helper()
	if addr != outsideAddr {
		inner, err := o.h.LinkByName("kout1")
		if err != nil {
			t.Fatal(err)
		}
		ip, _ := netlink.ParseAddr(addr + "/32")
		if err := o.h.AddrAdd(inner, ip); err != nil {
			t.Fatal(err)
		}
		dst, _ := netlink.ParseIPNet(addr + "/32")
		if err := netlink.RouteAdd(&netlink.Route{Dst: dst, Gw: net.ParseIP(outsideAddr), LinkIndex: o.host.Attrs().Index}); err != nil {
			t.Fatal(err)
		}
	}
	runtime.LockOSThread()
	netns.Set(o.ns)
	ln, err := net.Listen("tcp", addr+":9000")
	netns.Set(o.home)
	runtime.UnlockOSThread()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	from := make(chan string, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			select {
			case from <- c.RemoteAddr().(*net.TCPAddr).IP.String():
			default:
			}
			c.Write([]byte("hello from " + addr + "\n"))
			c.Close()
		}
	}()
	return from
}

// createSleeper creates a machine of localhost/app:1 in app that only sleeps, to exec in.
func createSleeper(t *testing.T, cl *client.Client, app string) api.Machine {
	t.Helper()
	m, err := cl.CreateMachine(context.Background(), app, api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
		Init: api.Init{Cmd: []string{"sh", "-c", "while true; do sleep 1; done"}}}})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestNetworkAndProxy(t *testing.T) {
	if os.Getenv("KILN_TEST_IN_NETNS") == "" {
		t.Fatal("this test must run in its own network namespace (TestMain arranges it)")
	}
	e := newEnv(t)
	outside := newOutside(t).listen(t, outsideAddr)
	addr, proxyAddr := freeAddr(t), freeAddr(t)
	srv := startServer(t, e, addr, "--proxy-listen", proxyAddr, "--idle-timeout", "4s", "--egress", egressAddr)
	defer stopOnFailure(&srv)
	ctx := context.Background()
	cl := client.New(srv.url, readToken(t, filepath.Join(e.dataDir, "admin-token")))
	loadImage(t, srv, imagetest.App(t), "localhost/app:1")

	// A web server that suspends when idle and wakes on request.
	httpd := "echo hello from $(busybox hostname) > /data/index.html; exec busybox httpd -f -p 8080 -h /data"
	out, errs, code := srv.kiln("", "machine", "run", "localhost/app:1", "--app", "web", "--port", "80:8080/http",
		"--autostop", "suspend", "--autostart", "--min-running", "0", "--", "sh", "-c", httpd)
	if code != 0 {
		t.Fatalf("machine run: %s\n%s", errs, srv.logs)
	}
	web := strings.TrimSpace(out)
	peer := createSleeper(t, cl, "web")
	if err := cl.CreateApp(ctx, "blog"); err != nil {
		t.Fatal(err)
	}
	other := createSleeper(t, cl, "blog")
	for _, m := range []struct{ app, id string }{{"web", web}, {"web", peer.ID}, {"blog", other.ID}} {
		if err := cl.Wait(ctx, m.app, m.id, "started", 90*time.Second); err != nil {
			t.Fatalf("%s: %v\n%s", m.id, err, srv.logs)
		}
	}
	webM, _ := cl.GetMachine(ctx, "web", web)
	if webM.PrivateIP == "" {
		t.Fatalf("machine has no private_ip: %+v", webM)
	}

	// A machine of the same app reaches the web server by name through kiln's resolver.
	// (The static busybox cannot use the C library's resolver, so its nslookup resolves.)
	name := web + ".vm.web.internal"
	script := fmt.Sprintf("ip=$(busybox nslookup %s | busybox awk '/^Address/ {a=$NF} END {print a}'); echo resolved $ip >&2; "+
		"for i in 1 2 3 4 5 6 7 8 9 10; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 $ip 8080 && exit 0; sleep 0.5; done; exit 1", name)
	res, err := cl.Exec(ctx, "web", peer.ID, []string{"sh", "-c", script}, "", 60*time.Second)
	if err != nil || res.ExitCode != 0 || !strings.Contains(res.Stdout, "hello from "+web) {
		t.Fatalf("same-app request by name: %+v %v", res, err)
	}
	// A machine of another app can neither resolve the name nor reach the address.
	res, _ = cl.Exec(ctx, "blog", other.ID, []string{"sh", "-c", "busybox nslookup " + name + "; printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 " + webM.PrivateIP + " 8080"}, "", 60*time.Second)
	if res.ExitCode == 0 || strings.Contains(res.Stdout, "hello") || strings.Contains(res.Stdout, webM.PrivateIP) {
		t.Fatalf("another app reached web's machine: %+v", res)
	}

	// Host services are out of reach: a listener on all the host's addresses does not
	// answer a machine at its gateway.
	hostSvc, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer hostSvc.Close()
	go func() {
		for {
			c, err := hostSvc.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("host-service\n"))
			c.Close()
		}
	}()
	gw := webM.PrivateIP[:strings.LastIndex(webM.PrivateIP, ".")] + ".1"
	port := hostSvc.Addr().(*net.TCPAddr).Port
	res, _ = cl.Exec(ctx, "web", peer.ID, []string{"sh", "-c", fmt.Sprintf("busybox nc -w 3 %s %d", gw, port)}, "", 30*time.Second)
	if strings.Contains(res.Stdout, "host-service") {
		t.Errorf("a machine reached a host service at its gateway %s:%d", gw, port)
	}

	// Egress leaves through NAT from the configured source address.
	res, err = cl.Exec(ctx, "web", peer.ID, []string{"sh", "-c", "echo out | busybox nc -w 5 " + outsideAddr + " 9000"}, "", 60*time.Second)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("egress connection: %+v %v", res, err)
	}
	select {
	case from := <-outside:
		if from != egressAddr {
			t.Errorf("the outside saw the connection come from %s, want the egress address %s", from, egressAddr)
		}
	case <-time.After(10 * time.Second):
		t.Error("the outside listener saw no connection")
	}

	// A raw TCP port cannot take a port another app serves.
	if _, errs, code := srv.kiln("", "machine", "run", "localhost/app:1", "--app", "blog", "--port", "80:5432"); code == 0 || !strings.Contains(errs, "port 80 is already used by app web") {
		t.Errorf("port taken by another app: exit %d, %s", code, errs)
	}
	for _, bad := range [][]string{{"--port", "80"}, {"--port", "80:8080/udp"}, {"--port", "80:8080", "--autostop", "sometimes"}, {"--autostop", "stop"}} {
		args := append([]string{"machine", "run", "localhost/app:1", "--app", "blog"}, bad...)
		if _, errs, code := srv.kiln("", args...); code == 0 || !strings.Contains(errs, strings.TrimPrefix(bad[len(bad)-2], "--")) {
			t.Errorf("%v: exit %d, %s", bad, code, errs)
		}
	}

	// Through the proxy by Host name.
	webGet := func() (int, string, string) { return proxyGet(t, srv, proxyAddr, "web.kiln.internal") }
	if code, body, from := webGet(); code != 200 || !strings.Contains(body, "hello from "+web) || from != web {
		t.Fatalf("proxied request: %d %q from %q", code, body, from)
	}
	req, _ := http.NewRequest("GET", "http://"+proxyAddr+"/", nil)
	req.Host = "nobody.kiln.internal"
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 404 {
		t.Fatalf("unknown host: %v %v", resp, err)
	}

	// Idle past 4s: the proxy suspends it (min_machines_running is 0).
	if err := cl.Wait(ctx, "web", web, "suspended", 60*time.Second); err != nil {
		t.Fatalf("idle machine was not suspended: %v\n%s", err, srv.logs)
	}
	// A request to the suspended machine resumes it and is answered, not refused.
	if code, body, _ := webGet(); code != 200 || !strings.Contains(body, "hello from "+web) {
		t.Fatalf("request to a suspended machine: %d %q\n%s", code, body, srv.logs)
	}
	evs, _ := cl.Events(ctx, "web", web)
	if !hasEvent(evs, "resume") || hasEvent(evs, "resume-failed-cold-boot") {
		t.Errorf("the wake was not a resume: %+v", evs)
	}

	// kill -9 of the server: the network stays up for running machines and the restart
	// keeps exactly what machines own.
	srv.stop(syscall.SIGKILL)
	before := kilnDevices(t)
	srv = startServer(t, e, addr, "--proxy-listen", proxyAddr, "--idle-timeout", "1h")
	cl = client.New(srv.url, readToken(t, filepath.Join(e.dataDir, "admin-token")))
	if after := kilnDevices(t); strings.Join(after, ",") != strings.Join(before, ",") || len(after) != 5 {
		t.Fatalf("devices before the crash %v, after the restart %v; want 2 bridges and 3 TAPs", before, after)
	}
	res, err = cl.Exec(ctx, "web", peer.ID, []string{"sh", "-c", script}, "", 60*time.Second)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("same-app request after the restart: %+v %v", res, err)
	}

	for _, m := range []struct{ app, id string }{{"web", web}, {"web", peer.ID}, {"blog", other.ID}} {
		if _, errs, code := srv.kiln("", "machine", "destroy", "-f", m.id); code != 0 {
			t.Fatalf("destroy %s: %s", m.id, errs)
		}
	}
	if left := kilnDevices(t); len(left) != 0 {
		t.Errorf("devices left after destroying every machine: %v", left)
	}
	// kiln's table stays for the git user's rules (kiln build --git), with no rule for
	// a machine's device.
	if rules, _ := exec.Command("nft", "list", "ruleset").CombinedOutput(); strings.Contains(string(rules), `"kb`) {
		t.Errorf("rules for machines' devices left (tables %s):\n%s", kilnTables(t), rules)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}

// Addresses in the outside namespace that a machine must not reach, and one it must.
const (
	privateAddr  = "10.99.0.5"       // a neighbour on the host's private network
	metadataAddr = "169.254.169.254" // a cloud's metadata service
	internetAddr = "203.0.113.5"     // anywhere on the internet
)

// egressProbe tries each address from inside a guest and prints "ADDR: " and whatever
// the listener there answered.
const egressProbe = `for a in ` + privateAddr + ` ` + metadataAddr + ` ` + internetAddr + `; do echo "$a: $(busybox nc -w 3 $a 9000 </dev/null)"; done`

// checkEgress holds what a guest's probe printed, and what the listeners saw, to want:
// the addresses it must reach.
func checkEgress(t *testing.T, who, out string, listeners map[string]<-chan string, want ...string) {
	t.Helper()
	for a, from := range listeners {
		reached := strings.Contains(out, a+": hello from "+a)
		if reached != slices.Contains(want, a) {
			t.Errorf("%s: reached %s = %v, want %v; it printed:\n%s", who, a, reached, !reached, out)
		}
		if !reached {
			continue
		}
		select {
		case src := <-from:
			if src != egressAddr {
				t.Errorf("%s: %s saw the connection come from %s, want the egress address %s", who, a, src, egressAddr)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("%s: %s saw no connection", who, a)
		}
	}
}

// checkGitEgress has the server fetch a build context from each listener (kiln build
// --git over http), as the caller of a build may, and holds what the listeners saw to
// want: git runs on the host, as kiln-git, under the machines' egress policy.
func checkGitEgress(t *testing.T, srv *kilnServer, listeners map[string]<-chan string, want ...string) {
	t.Helper()
	if _, err := user.Lookup(build.GitUserName); err != nil {
		t.Fatalf("the host lacks the user %s that git runs as (scripts/setup.sh creates it): %v", build.GitUserName, err)
	}
	for a, from := range listeners {
		_, errs, code := srv.kiln("", "build", "--git", "http://"+a+":9000/repo.git", "--project", "egress", "--tag", "localhost/egress/git:1")
		if code == 0 {
			t.Fatalf("kiln build --git from %s, which serves no repository, succeeded", a)
		}
		// The listener reports a connection before it answers, and git has its answer
		// (or its refusal) when kiln build returns.
		var reached bool
		select {
		case <-from:
			reached = true
		default:
		}
		if reached != slices.Contains(want, a) {
			t.Errorf("kiln build --git: the server's git reached %s = %v, want %v; kiln said:\n%s", a, reached, !reached, errs)
		}
	}
}

// Machines and builders run other people's code: they reach the internet and nothing
// else the host can reach, a private network or the metadata service, until the
// operator allows a range (--egress-allow, here from the config file).
func TestEgressPolicy(t *testing.T) {
	if os.Getenv("KILN_TEST_IN_NETNS") == "" {
		t.Fatal("this test must run in its own network namespace (TestMain arranges it)")
	}
	// The git user's rules of every kiln table apply to it, the strictest winning: a
	// table left by an earlier test's server (killed, or stopped with machines) would
	// refuse what this server allows. Only this test binary's servers made them, in its
	// own namespace.
	if out, err := exec.Command("nft", "list", "tables").Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			if f := strings.Fields(line); len(f) == 3 && f[0] == "table" && strings.HasPrefix(f[2], "kiln_") {
				exec.Command("nft", "delete", "table", f[1], f[2]).Run()
			}
		}
	}
	e := newEnv(t)
	o := newOutside(t)
	listeners := map[string]<-chan string{}
	for _, a := range []string{privateAddr, metadataAddr, internetAddr} {
		listeners[a] = o.listen(t, a)
	}
	addr := freeAddr(t)
	flags := []string{"--proxy-listen", "off", "--egress", egressAddr, "--build-cache-size", "4G", "--builder-memory", "1024"}
	srv := startServer(t, e, addr, flags...)
	defer stopOnFailure(&srv)
	ctx := context.Background()
	cl := client.New(srv.url, readToken(t, filepath.Join(e.dataDir, "admin-token")))
	dir := loadBase(t, srv)
	loadImage(t, srv, imagetest.App(t), "localhost/app:1")
	if err := cl.CreateApp(ctx, "egress"); err != nil {
		t.Fatal(err)
	}
	m := createSleeper(t, cl, "egress")
	if err := cl.Wait(ctx, "egress", m.ID, "started", 90*time.Second); err != nil {
		t.Fatalf("%v\n%s", err, srv.logs)
	}
	probeMachine := func() string {
		res, err := cl.Exec(ctx, "egress", m.ID, []string{"sh", "-c", egressProbe}, "", 60*time.Second)
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("probe in the machine: %+v %v", res, err)
		}
		return res.Stdout
	}
	build := func(tag, step string) string {
		os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte("FROM localhost/busybox:1\nRUN "+step+"\n"), 0o644)
		out, errs, code := srv.kiln("", "build", dir, "--project", "egress", "--tag", tag)
		if code != 0 {
			t.Fatalf("kiln build: exit %d\n%s\n%s\n%s", code, out, errs, srv.logs)
		}
		return out + errs
	}
	checkEgress(t, "a machine", probeMachine(), listeners, internetAddr)
	checkEgress(t, "a RUN step", build("localhost/egress/probe:1", egressProbe), listeners, internetAddr)
	checkGitEgress(t, srv, listeners, internetAddr)

	// The operator opens the private range on purpose; the metadata service stays closed.
	srv.stop(syscall.SIGTERM)
	config := filepath.Join(e.dataDir, "server.toml")
	os.WriteFile(config, []byte(`egress-allow = ["10.99.0.0/24"]`+"\n"), 0o644)
	srv = startServer(t, e, addr, append(flags, "--config", config)...)
	cl = client.New(srv.url, readToken(t, filepath.Join(e.dataDir, "admin-token")))
	checkEgress(t, "a machine with 10.99.0.0/24 allowed", probeMachine(), listeners, internetAddr, privateAddr)
	checkEgress(t, "a RUN step with 10.99.0.0/24 allowed", build("localhost/egress/probe:2", "echo allowed; "+egressProbe), listeners, internetAddr, privateAddr)
	checkGitEgress(t, srv, listeners, internetAddr, privateAddr)
	out, errs, code := srv.kiln("", "limits", "show")
	if code != 0 || !strings.Contains(out, "network.egress_allow") || !strings.Contains(out, "10.99.0.0/24") || !strings.Contains(out, "169.254.0.0/16") {
		t.Errorf("limits show does not list the egress policy: exit %d\n%s%s", code, out, errs)
	}

	if _, errs, code := srv.kiln("", "machine", "destroy", "-f", m.ID); code != 0 {
		t.Fatalf("destroy: %s", errs)
	}
	// The builder outlived the restart above (adopted, under the new policy); it goes
	// only when asked.
	if _, errs, code := srv.kiln("", "build", "builder", "rm", "--project", "egress"); code != 0 {
		t.Fatalf("build builder rm: %s", errs)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}
