package network

import (
	"context"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/kilnhq/kiln/internal/testutil"
)

func TestMain(m *testing.M) {
	if code, ran := testutil.InNetNS(); ran {
		os.Exit(code)
	}
	os.Exit(testutil.Finish(m.Run()))
}

func links(t *testing.T, m *Manager) []string {
	t.Helper()
	all, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range all {
		if m.ownsLink(l.Attrs().Name) {
			out = append(out, l.Attrs().Name)
		}
	}
	return out
}

func lookup(t *testing.T, server netip.Addr, name string) ([]string, error) {
	t.Helper()
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "udp", netip.AddrPortFrom(server, 53).String())
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return r.LookupHost(ctx, name)
}

func TestAttachResolveIsolateDetach(t *testing.T) {
	ctx := context.Background()
	dir := testutil.TempDir(t)
	m, err := Open(dir, Config{Egress: netip.MustParseAddr("192.0.2.1")}, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	a1, err := m.Attach(ctx, "shop", "m1")
	if err != nil {
		t.Fatal(err)
	}
	a2, err := m.Attach(ctx, "shop", "m2")
	if err != nil {
		t.Fatal(err)
	}
	b1, err := m.Attach(ctx, "blog", "m3")
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := m.Attach(ctx, "shop", "m1"); again != a1 {
		t.Fatalf("a second attach changed the lease: %+v then %+v", a1, again)
	}
	if a1.Gateway != a2.Gateway || a1.Addr == a2.Addr || a1.Gateway == b1.Gateway {
		t.Fatalf("leases: %+v %+v %+v", a1, a2, b1)
	}
	if got := links(t, m); len(got) != 5 {
		t.Fatalf("devices: %v, want 2 bridges and 3 TAPs", got)
	}

	// Each app's resolver knows its own machines and nothing of the other app.
	got, err := lookup(t, a1.Gateway, "m2.vm.shop.internal")
	if err != nil || len(got) != 1 || got[0] != a2.Addr.Addr().String() {
		t.Fatalf("m2.vm.shop.internal = %v, %v; want %s", got, err, a2.Addr.Addr())
	}
	if got, err := lookup(t, a1.Gateway, "shop.internal"); err != nil || len(got) != 2 {
		t.Fatalf("shop.internal = %v, %v; want both machines", got, err)
	}
	if got, err := lookup(t, a1.Gateway, "m3.vm.blog.internal"); err == nil {
		t.Fatalf("shop's resolver answered for blog: %v", got)
	}

	out, err := exec.Command("nft", "list", "table", "inet", m.tableName()).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list: %v: %s", err, out)
	}
	for _, want := range []string{"snat ip to 192.0.2.1", `iifname "kb` + m.tag + `*" oifname "kb` + m.tag + `*" drop`} {
		if !strings.Contains(string(out), want) {
			t.Errorf("rules lack %q:\n%s", want, out)
		}
	}

	// A restart that finds m2 gone, and a stray device of kiln's, cleans both up.
	stray := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: m.tapName(99, 9)}, Mode: netlink.TUNTAP_MODE_TAP}
	if err := netlink.LinkAdd(stray); err != nil {
		t.Fatal(err)
	}
	m.Close()
	m2, err := Open(dir, Config{}, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if err := m2.Reconcile(ctx, func(id string) bool { return id != "m2" }); err != nil {
		t.Fatal(err)
	}
	if got := links(t, m2); len(got) != 4 {
		t.Fatalf("after reconcile: %v, want 2 bridges and 2 TAPs", got)
	}
	if l, ok := m2.Lookup("m1"); !ok || l != a1 {
		t.Fatalf("m1 lost its lease over a restart: %+v", l)
	}
	for _, id := range []string{"m1", "m3"} {
		if err := m2.Detach(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if got := links(t, m2); len(got) != 0 {
		t.Fatalf("after detaching every machine: %v left", got)
	}
	if out, err := exec.Command("nft", "list", "table", "inet", m2.tableName()).CombinedOutput(); err == nil {
		t.Fatalf("the rules table is still there:\n%s", out)
	}
}

func TestBadConfig(t *testing.T) {
	for _, pool := range []string{"10.0.0.0/24", "fd00::/48", "10.0.0.0/4"} {
		_, err := Open(testutil.TempDir(t), Config{Pool: netip.MustParsePrefix(pool)}, nil)
		if err == nil || !strings.Contains(err.Error(), "between /8 and /23") {
			t.Errorf("pool %s: %v", pool, err)
		}
	}
}

func TestPickSubnetSkipsRoutedSubnets(t *testing.T) {
	pool := netip.MustParsePrefix("10.208.0.0/16")
	p := netip.MustParsePrefix
	for _, tc := range []struct {
		name   string
		used   map[int]bool
		routes []netip.Prefix
		want   int
		ok     bool
	}{
		{"nothing routed", nil, nil, 0, true},
		{"used by an app", map[int]bool{0: true}, nil, 1, true},
		{"another data dir's bridge", nil, []netip.Prefix{p("10.208.0.0/24")}, 1, true},
		{"used and routed", map[int]bool{0: true}, []netip.Prefix{p("10.208.1.0/24")}, 2, true},
		{"a host route inside", nil, []netip.Prefix{p("10.208.0.77/32")}, 1, true},
		{"a wider route inside the pool", nil, []netip.Prefix{p("10.208.0.0/23")}, 2, true},
		{"routes covering the pool", nil, []netip.Prefix{p("0.0.0.0/0"), p("10.0.0.0/8"), p("10.208.0.0/16")}, 0, true},
		{"routes elsewhere", nil, []netip.Prefix{p("192.168.1.0/24"), p("10.209.0.0/24")}, 0, true},
		{"all routed", nil, []netip.Prefix{p("10.208.0.0/17"), p("10.208.128.0/17")}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := pickSubnet(pool, tc.used, tc.routes)
			if got != tc.want || ok != tc.ok {
				t.Errorf("pickSubnet = %d, %v; want %d, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}

// Two kiln data directories on one host: the second must not take the /24 the first
// one's bridge routes, or its machines get "no route to host".
func TestTwoDataDirsTakeDifferentSubnets(t *testing.T) {
	ctx := context.Background()
	var leases []Lease
	for i := 0; i < 2; i++ {
		m, err := Open(testutil.TempDir(t), Config{}, os.Stderr)
		if err != nil {
			t.Fatal(err)
		}
		defer m.RemoveAll(ctx)
		defer m.Close()
		l, err := m.Attach(ctx, "shop", "m1")
		if err != nil {
			t.Fatal(err)
		}
		leases = append(leases, l)
	}
	if leases[0].Addr.Masked() == leases[1].Addr.Masked() {
		t.Fatalf("both data dirs took %s", leases[0].Addr.Masked())
	}
}

// nftList returns kiln's table as nft prints it.
func nftList(t *testing.T, m *Manager) string {
	t.Helper()
	out, err := exec.Command("nft", "list", "table", "inet", m.tableName()).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list: %v: %s", err, out)
	}
	return string(out)
}

// chainOf returns one chain's lines out of `nft list table`.
func chainOf(listing, name string) string {
	_, rest, ok := strings.Cut(listing, "chain "+name+" {")
	if !ok {
		return ""
	}
	rules, _, _ := strings.Cut(rest, "\n\t}")
	return rules
}

// The egress sets: what is blocked by default, what the operator allows, and kiln's
// own hosts, which no allow opens; rewriting them is idempotent.
func TestEgressSets(t *testing.T) {
	ctx := context.Background()
	allow := []netip.Prefix{netip.MustParsePrefix("10.1.2.0/24"), netip.MustParsePrefix("10.1.2.128/25")}
	m, err := Open(testutil.TempDir(t), Config{EgressAllow: allow, ConfineUIDs: []uint32{4242}}, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer m.RemoveAll(ctx)
	defer m.Close()
	if _, err := m.Attach(ctx, "shop", "m1"); err != nil {
		t.Fatal(err)
	}
	// Peer hosts appear in the never set, even one inside an allowed range.
	peers := []netip.Addr{netip.MustParseAddr("203.0.113.7"), netip.MustParseAddr("10.1.2.3")}
	if err := m.BlockHosts(ctx, "peers", peers); err != nil {
		t.Fatal(err)
	}
	first := nftList(t, m)
	for _, want := range []string{
		"set egress_blocked", "10.0.0.0/8", "169.254.0.0/16", "192.168.0.0/16", "172.16.0.0/12", "100.64.0.0/10",
		"set egress_allow", "10.1.2.0/24",
		"set egress_never", "203.0.113.7", "10.1.2.3", "10.208.0.0/16",
		"ip daddr @egress_never reject with icmpx admin-prohibited", "ip daddr @egress_allow accept", "ip daddr @egress_blocked reject with icmpx admin-prohibited",
	} {
		if !strings.Contains(first, want) {
			t.Errorf("rules lack %q:\n%s", want, first)
		}
	}
	// Machines' traffic (forward) and the confined user's own (output) meet one policy,
	// checked in one order; the user's DNS goes first, to the host's resolver.
	for _, chain := range []string{"forward", "output"} {
		rules := chainOf(first, chain)
		never := strings.Index(rules, "@egress_never")
		allowAt := strings.Index(rules, "@egress_allow")
		blocked := strings.Index(rules, "@egress_blocked")
		if never < 0 || !(never < allowAt && allowAt < blocked) {
			t.Errorf("%s: the sets are not checked never, allow, blocked in that order:\n%s", chain, rules)
		}
	}
	out := chainOf(first, "output")
	for _, want := range []string{
		"meta skuid 4242 meta l4proto { tcp, udp } th dport 53 accept",
		"meta skuid 4242 meta nfproto ipv6 reject with icmpx admin-prohibited",
		"meta skuid 4242 ip daddr @egress_never reject with icmpx admin-prohibited",
		"meta skuid 4242 ip daddr @egress_allow accept",
		"meta skuid 4242 ip daddr @egress_blocked reject with icmpx admin-prohibited",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the output chain lacks %q:\n%s", want, out)
		}
	}
	if dns := strings.Index(out, "dport 53"); dns < 0 || dns > strings.Index(out, "@egress_never") {
		t.Errorf("the confined user's DNS is refused before it is allowed:\n%s", out)
	}
	if strings.Count(out, "\n") != strings.Count(out, "meta skuid 4242")+1 {
		t.Errorf("the output chain holds rules for other traffic than the confined user's:\n%s", out)
	}
	if err := m.BlockHosts(ctx, "peers", peers); err != nil {
		t.Fatal(err)
	}
	if err := m.Reconcile(ctx, func(string) bool { return true }); err != nil {
		t.Fatal(err)
	}
	if again := nftList(t, m); again != first {
		t.Errorf("rewriting the rules changed them:\n%s\nthen\n%s", first, again)
	}
	if _, err := Open(testutil.TempDir(t), Config{EgressAllow: []netip.Prefix{netip.MustParsePrefix("fd00::/8")}}, nil); err == nil {
		t.Error("an IPv6 egress allow was accepted")
	}
}

// The VMMs' users send nothing from the host's network stack, not even DNS; root still
// connects. The rules go with RemoveAll.
func TestVMMUsersSendNothing(t *testing.T) {
	ctx := context.Background()
	m := openReconciled(t, Config{DenyUIDs: [2]uint32{5000, 5010}})
	addr := testutil.Listen(t, "tcp", "127.0.0.1:0").Addr().String()
	if !connectAs(ctx, nil, addr) {
		t.Fatal("root could not connect: the test is broken")
	}
	for _, uid := range []uint32{5000, 5005, 5010} {
		if connectAs(ctx, &syscall.Credential{Uid: uid, Gid: uid}, addr) {
			t.Errorf("VMM user %d connected to %s", uid, addr)
		}
	}
	if !connectAs(ctx, &syscall.Credential{Uid: 5011, Gid: 5011}, addr) {
		t.Error("user 5011, outside the range, was refused")
	}
	if err := m.RemoveAll(ctx); err != nil {
		t.Fatal(err)
	}
	if !connectAs(ctx, &syscall.Credential{Uid: 5005, Gid: 5005}, addr) {
		t.Error("the rule outlived RemoveAll")
	}
}

// openReconciled opens a network manager with cfg and applies its rules; it is closed
// when the test ends.
func openReconciled(t *testing.T, cfg Config) *Manager {
	t.Helper()
	m, err := Open(testutil.TempDir(t), cfg, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if err := m.Reconcile(context.Background(), func(string) bool { return true }); err != nil {
		t.Fatal(err)
	}
	return m
}

// connectAs reports whether user cred (nil: the test's own) could open a TCP connection
// to addr.
func connectAs(ctx context.Context, cred *syscall.Credential, addr string) bool {
	host, port, _ := net.SplitHostPort(addr)
	cmd := exec.CommandContext(ctx, "bash", "-c", "exec 3<>/dev/tcp/"+host+"/"+port)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	return cmd.Run() == nil
}

// A confined user (kiln's git) is held to the egress policy from the host itself, with
// or without apps: loopback and private addresses are refused to it, DNS is not, and
// the rules are its own (root still connects). They go with RemoveAll.
func TestConfinedUser(t *testing.T) {
	ctx := context.Background()
	const uid = 4242
	m := openReconciled(t, Config{ConfineUIDs: []uint32{uid}})
	service := testutil.Listen(t, "tcp", "127.0.0.1:0")
	dns := testutil.Listen(t, "tcp", "127.0.0.1:53")
	connect := func(cred *syscall.Credential, addr string) bool { return connectAs(ctx, cred, addr) }
	confined := &syscall.Credential{Uid: uid, Gid: uid, Groups: []uint32{}}
	if !connect(nil, service.Addr().String()) {
		t.Fatal("root cannot reach the listener: the rules are not the confined user's own")
	}
	if connect(confined, service.Addr().String()) {
		t.Errorf("the confined user reached a service on loopback:\n%s", nftList(t, m))
	}
	if !connect(confined, dns.Addr().String()) {
		t.Errorf("the confined user cannot reach DNS on loopback:\n%s", nftList(t, m))
	}
	if err := m.RemoveAll(ctx); err != nil {
		t.Fatal(err)
	}
	if !connect(confined, service.Addr().String()) {
		t.Error("the confined user's rules are left after RemoveAll")
	}
}
