package network

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
)

// Egress policy: machines and builders run other people's code, so their traffic may
// leave for the internet and nothing else the host can reach. Three interval sets in
// kiln's table decide, in this order:
//
//   - egress_never: this host's own addresses, kiln's database and peer hosts (they hold
//     the admin token), and the app pool (other apps' networks). No allow opens them.
//   - egress_allow: the operator's --egress-allow ranges.
//   - egress_blocked: BlockedByDefault, the ranges that are not the internet.
//
// Traffic to this host itself never reaches the forward chain: the input chain refuses
// all but DNS at a machine's own gateway.

// BlockedByDefault is every IPv4 range a machine may not reach unless the operator
// allows it: private, shared, link-local (cloud metadata at 169.254.169.254),
// loopback, multicast and reserved space. The documentation ranges (192.0.2.0/24,
// 198.51.100.0/24, 203.0.113.0/24) are left open: they are routed nowhere on the
// internet, and tests use them to stand for it.
var BlockedByDefault = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),        // "this network"
	netip.MustParsePrefix("10.0.0.0/8"),       // RFC 1918
	netip.MustParsePrefix("100.64.0.0/10"),    // carrier-grade NAT, also Tailscale's range
	netip.MustParsePrefix("127.0.0.0/8"),      // loopback
	netip.MustParsePrefix("169.254.0.0/16"),   // link-local, cloud metadata services
	netip.MustParsePrefix("172.16.0.0/12"),    // RFC 1918
	netip.MustParsePrefix("168.63.129.16/32"), // Azure's host channel (WireServer), a public address
	netip.MustParsePrefix("192.0.0.0/24"),     // IETF protocol assignments
	netip.MustParsePrefix("192.168.0.0/16"),   // RFC 1918
	netip.MustParsePrefix("198.18.0.0/15"),    // benchmarking, used inside some data centres
	netip.MustParsePrefix("224.0.0.0/4"),      // multicast
	netip.MustParsePrefix("240.0.0.0/4"),      // reserved, and the broadcast address
}

// BlockHosts sets the addresses of one kind of kiln's own hosts ("database", "peers")
// that machines must never reach, whatever --egress-allow says, and rewrites the rules
// if that changed anything. Calling it again with the same addresses does nothing.
func (m *Manager) BlockHosts(ctx context.Context, kind string, addrs []netip.Addr) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	want := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if a = a.Unmap(); a.Is4() {
			want = append(want, a)
		}
	}
	slices.SortFunc(want, netip.Addr.Compare)
	want = slices.Compact(want)
	if slices.Equal(m.hosts[kind], want) {
		return nil
	}
	if m.hosts == nil {
		m.hosts = map[string][]netip.Addr{}
	}
	m.hosts[kind] = want
	if !m.tableWanted() {
		return nil // no table yet; the first machine's rules carry the addresses
	}
	return m.applyRules(ctx)
}

// ResolveHosts turns host names and literal addresses into IPv4 addresses. Names that
// do not resolve are reported in the error; the addresses found are returned anyway.
func ResolveHosts(ctx context.Context, hosts []string) ([]netip.Addr, error) {
	var out []netip.Addr
	var failed []string
	for _, h := range hosts {
		if h == "" || strings.HasPrefix(h, "/") { // a Unix socket directory
			continue
		}
		if a, err := netip.ParseAddr(h); err == nil {
			out = append(out, a)
			continue
		}
		as, err := net.DefaultResolver.LookupNetIP(ctx, "ip4", h)
		if err != nil {
			failed = append(failed, fmt.Sprintf("%s (%v)", h, err))
			continue
		}
		out = append(out, as...)
	}
	if len(failed) > 0 {
		return out, fmt.Errorf("resolving %s", strings.Join(failed, ", "))
	}
	return out, nil
}

// neverPrefixes is egress_never: kiln's own hosts and the app pool.
func (m *Manager) neverPrefixes() []netip.Prefix {
	out := []netip.Prefix{m.cfg.Pool}
	for _, a := range hostAddrs() {
		out = append(out, netip.PrefixFrom(a, 32))
	}
	for _, as := range m.hosts {
		for _, a := range as {
			out = append(out, netip.PrefixFrom(a, 32))
		}
	}
	return out
}

// hostAddrs lists this host's IPv4 addresses, all interfaces.
func hostAddrs() []netip.Addr {
	as, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range as {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok {
			out = append(out, ip)
		}
	}
	return out
}

// disjoint drops prefixes that another in the list contains: an nftables interval set
// refuses overlapping elements.
func disjoint(ps []netip.Prefix) []netip.Prefix {
	ps = slices.Clone(ps)
	for i := range ps {
		ps[i] = ps[i].Masked()
	}
	// Shorter prefixes first, so that each one is seen before those it contains.
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if a.Bits() != b.Bits() {
			return a.Bits() - b.Bits()
		}
		return a.Addr().Compare(b.Addr())
	})
	var out []netip.Prefix
	for _, p := range ps {
		if !slices.ContainsFunc(out, func(q netip.Prefix) bool { return q.Contains(p.Addr()) }) {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

// nftSet renders one IPv4 interval set.
func nftSet(b *strings.Builder, name string, ps []netip.Prefix) {
	fmt.Fprintf(b, "\tset %s {\n\t\ttype ipv4_addr; flags interval;\n", name)
	if ps = disjoint(ps); len(ps) > 0 {
		elems := make([]string, len(ps))
		for i, p := range ps {
			elems[i] = p.String()
		}
		fmt.Fprintf(b, "\t\telements = { %s }\n", strings.Join(elems, ", "))
	}
	b.WriteString("\t}\n")
}

// egressSets renders the sets, at the table's top level.
func (m *Manager) egressSets(b *strings.Builder) {
	nftSet(b, "egress_never", m.neverPrefixes())
	nftSet(b, "egress_allow", m.cfg.EgressAllow)
	nftSet(b, "egress_blocked", BlockedByDefault)
}

// egressRules renders the forward chain's rules for new traffic out of the pool. A
// refused connection is rejected rather than dropped, so that a build step fails at once
// with "administratively prohibited" instead of hanging until its own timeout.
func egressRules(b *strings.Builder, all string) {
	fmt.Fprintf(b, "\t\tiifname %q ip daddr @egress_never reject with icmpx type admin-prohibited\n", all)
	fmt.Fprintf(b, "\t\tiifname %q ip daddr @egress_allow accept\n", all)
	fmt.Fprintf(b, "\t\tiifname %q ip daddr @egress_blocked reject with icmpx type admin-prohibited\n", all)
}

// confinedRules renders the output chain's rules for the host's own processes running as
// one of uids. The order follows the machines' policy (never, allow, blocked), after two
// rules of its own:
//   - DNS, to any address, first: the host's resolver is on loopback or on one of this
//     host's own addresses, both closed below. Port 53 is all that gets past the policy.
//   - IPv6 is refused, as it is for machines: the sets are IPv4 only.
//
// Loopback is in egress_blocked, and this host's addresses in egress_never, so such a
// process reaches no service on the host either (no --egress-allow opens those).
func confinedRules(b *strings.Builder, uids []uint32) {
	for _, uid := range uids {
		who := fmt.Sprintf("meta skuid %d", uid)
		fmt.Fprintf(b, "\t\t%s meta l4proto { tcp, udp } th dport 53 accept\n", who)
		fmt.Fprintf(b, "\t\t%s meta nfproto ipv6 reject with icmpx type admin-prohibited\n", who)
		fmt.Fprintf(b, "\t\t%s ip daddr @egress_never reject with icmpx type admin-prohibited\n", who)
		fmt.Fprintf(b, "\t\t%s ip daddr @egress_allow accept\n", who)
		fmt.Fprintf(b, "\t\t%s ip daddr @egress_blocked reject with icmpx type admin-prohibited\n", who)
	}
}

// pickSubnet returns the index of the first /24 of pool that is neither used nor
// overlapped by one of routes (another kiln data directory's bridge, a VPN's range).
// Routes that cover the whole pool, the default route among them, are ignored: no
// choice of /24 avoids them, and a connected /24 wins over them.
func pickSubnet(pool netip.Prefix, used map[int]bool, routes []netip.Prefix) (int, bool) {
	n := 1 << (24 - pool.Bits())
	for i := 0; i < n; i++ {
		if used[i] {
			continue
		}
		sub := subnetOf(pool, i)
		if !slices.ContainsFunc(routes, func(r netip.Prefix) bool {
			return r.Overlaps(sub) && !(r.Bits() <= pool.Bits() && r.Contains(pool.Addr()))
		}) {
			return i, true
		}
	}
	return 0, false
}

// hostRoutes lists the destinations of the host's IPv4 routes in every table.
func hostRoutes() ([]netip.Prefix, error) {
	rs, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: 0}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("listing the host's routes: %w", err)
	}
	var out []netip.Prefix
	for _, r := range rs {
		if r.Dst == nil {
			continue // a default route
		}
		ip, ok := netip.AddrFromSlice(r.Dst.IP.To4())
		bits, _ := r.Dst.Mask.Size()
		if ok {
			out = append(out, netip.PrefixFrom(ip, bits))
		}
	}
	return out, nil
}
