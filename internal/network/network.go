// Package network gives machines a private network per app: a Linux bridge per app with
// a /24 out of a pool, a TAP device and a fixed address per machine, a DNS resolver on
// each app's gateway that answers only that app's names, nftables rules that keep apps
// apart, and NAT for egress.
//
// What exists on the host follows one state file (DIR/state.json), written before any
// device is created. Reconcile makes the host match it: missing devices are created,
// devices and rules kiln made but no longer records are removed. All of kiln's devices
// carry a prefix derived from the data directory, and all rules live in one nftables
// table of kiln's own, so nothing else on the host is touched.
package network

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// Config is the operator's choice of addresses.
type Config struct {
	// Pool holds every app's /24; its prefix must be between /8 and /23.
	Pool netip.Prefix
	// Egress is the source address machines' outbound traffic is translated to. The zero
	// value masquerades behind whatever address the outbound interface has; Disabled
	// turns egress off.
	Egress    netip.Addr
	EgressOff bool
	// EgressAllow opens ranges that BlockedByDefault closes (a private registry, say).
	EgressAllow []netip.Prefix
	// ConfineUIDs are host users whose own traffic is held to the same egress policy
	// (kiln's git fetches for `kiln build --git` run as one): their rules are in the
	// table's output chain, which exists while kiln runs, with or without apps.
	ConfineUIDs []uint32
	// DenyUIDs, a range FIRST-LAST (0-0: none), are host users that may send nothing
	// from the host's own network stack: the VMMs' users. QEMU runs in an empty network
	// namespace of its own; a jailed Firecracker shares the host's, and needs no socket
	// but its Unix ones.
	DenyUIDs     [2]uint32
	DomainSuffix string // names are <machine>.vm.<app>.<suffix>; default "internal"
}

// DefaultPool is where app networks come from unless the operator says otherwise.
var DefaultPool = netip.MustParsePrefix("10.208.0.0/16")

// Lease is a machine's place on its app's network.
type Lease struct {
	App     string
	Machine string
	TAP     string
	MAC     string
	Addr    netip.Prefix // the machine's address with its network's length
	Gateway netip.Addr   // the bridge's address: router and resolver
	Search  string       // the DNS search domain for the app's machine names
}

// Cmdline is what kiln-init needs to configure the guest's side.
func (l Lease) Cmdline() string {
	return fmt.Sprintf("kiln.net=%s,%s,%s kiln.dns=%s kiln.search=%s", l.MAC, l.Addr, l.Gateway, l.Gateway, l.Search)
}

type state struct {
	Apps     map[string]int          `json:"apps"` // app → index of its /24 in the pool
	Machines map[string]machineState `json:"machines"`
}

type machineState struct {
	App  string `json:"app"`
	Host int    `json:"host"` // last octet of its address
}

// Manager owns this host's app networks.
type Manager struct {
	dir string
	tag string // 4 hex digits from the data directory, in every device name
	cfg Config
	log io.Writer

	mu        sync.Mutex
	st        state
	resolvers map[string]*resolver    // app → resolver on its gateway
	hosts     map[string][]netip.Addr // kind → kiln's own hosts machines never reach
}

// Open loads the state; call Reconcile before attaching machines.
func Open(dir string, cfg Config, log io.Writer) (*Manager, error) {
	if !cfg.Pool.IsValid() {
		cfg.Pool = DefaultPool
	}
	if !cfg.Pool.Addr().Is4() || cfg.Pool.Bits() < 8 || cfg.Pool.Bits() > 23 {
		return nil, errdefs.Invalid("network pool %s: want an IPv4 prefix between /8 and /23, like 10.208.0.0/16", cfg.Pool)
	}
	cfg.Pool = cfg.Pool.Masked()
	for _, p := range cfg.EgressAllow {
		if !p.Addr().Is4() {
			return nil, errdefs.Invalid("egress allow %s: want an IPv4 prefix like 10.1.2.0/24 (machines have no IPv6)", p)
		}
	}
	if cfg.DomainSuffix == "" {
		cfg.DomainSuffix = "internal"
	}
	if _, err := exec.LookPath("nft"); err != nil {
		return nil, errdefs.Missing("nft (nftables)", "nftables")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	abs, _ := filepath.Abs(dir)
	sum := sha256.Sum256([]byte(abs))
	m := &Manager{dir: dir, tag: hex.EncodeToString(sum[:2]), cfg: cfg, log: log, resolvers: map[string]*resolver{}}
	m.st = state{Apps: map[string]int{}, Machines: map[string]machineState{}}
	b, err := os.ReadFile(m.statePath())
	if err == nil {
		if err := json.Unmarshal(b, &m.st); err != nil {
			return nil, fmt.Errorf("network state %s is damaged: %w", m.statePath(), err)
		}
	} else if !os.IsNotExist(err) {
		return nil, err
	}
	if m.st.Apps == nil {
		m.st.Apps = map[string]int{}
	}
	if m.st.Machines == nil {
		m.st.Machines = map[string]machineState{}
	}
	return m, nil
}

func (m *Manager) statePath() string { return filepath.Join(m.dir, "state.json") }

func (m *Manager) save() error {
	b, _ := json.MarshalIndent(m.st, "", "  ")
	return atomicfile.WriteFile(m.statePath(), b, 0o600)
}

func (m *Manager) logf(format string, args ...any) {
	if m.log != nil {
		fmt.Fprintf(m.log, "kiln: network: "+format+"\n", args...)
	}
}

// Names of kiln's devices: kb<tag><app index> for bridges, kt<tag><app index><host> for
// TAPs; at most 12 characters, under Linux's 15.
func (m *Manager) bridgeName(idx int) string { return fmt.Sprintf("kb%s%04x", m.tag, idx) }
func (m *Manager) tapName(idx, host int) string {
	return fmt.Sprintf("kt%s%04x%02x", m.tag, idx, host)
}
func (m *Manager) ownsLink(name string) bool {
	return strings.HasPrefix(name, "kb"+m.tag) || strings.HasPrefix(name, "kt"+m.tag)
}
func (m *Manager) tableName() string { return "kiln_" + m.tag }

// subnet is app index idx's /24.
func (m *Manager) subnet(idx int) netip.Prefix { return subnetOf(m.cfg.Pool, idx) }

func subnetOf(pool netip.Prefix, idx int) netip.Prefix {
	a := pool.Addr().As4()
	base := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	base += uint32(idx) << 8
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(base >> 24), byte(base >> 16), byte(base >> 8), 0}), 24)
}

func hostAddr(sub netip.Prefix, host int) netip.Addr {
	a := sub.Addr().As4()
	a[3] = byte(host)
	return netip.AddrFrom4(a)
}

func (m *Manager) lease(id string, ms machineState) Lease {
	idx := m.st.Apps[ms.App]
	sub := m.subnet(idx)
	addr := hostAddr(sub, ms.Host)
	a := addr.As4()
	return Lease{
		App: ms.App, Machine: id, TAP: m.tapName(idx, ms.Host),
		MAC:     fmt.Sprintf("06:6b:%02x:%02x:%02x:%02x", a[0], a[1], a[2], a[3]),
		Addr:    netip.PrefixFrom(addr, 24),
		Gateway: hostAddr(sub, 1),
		Search:  "vm." + ms.App + "." + m.cfg.DomainSuffix,
	}
}

// Lookup returns a machine's lease, if it has one.
func (m *Manager) Lookup(id string) (Lease, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ms, ok := m.st.Machines[id]
	if !ok {
		return Lease{}, false
	}
	return m.lease(id, ms), true
}

// Attach gives a machine its address (the same one every time until Detach) and makes
// sure its app's bridge, its TAP device, the rules and the resolver exist.
func (m *Manager) Attach(ctx context.Context, app, id string) (Lease, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ms, ok := m.st.Machines[id]
	if !ok {
		if _, err := m.appIndex(app); err != nil {
			return Lease{}, err
		}
		host, err := m.freeHost(app)
		if err != nil {
			return Lease{}, err
		}
		ms = machineState{App: app, Host: host}
		m.st.Machines[id] = ms
		// Recorded before anything is created, so that a crash leaves enough to clean up.
		if err := m.save(); err != nil {
			delete(m.st.Machines, id)
			return Lease{}, err
		}
	}
	if err := m.ensureApp(ms.App); err != nil {
		return Lease{}, err
	}
	l := m.lease(id, ms)
	if err := m.ensureTAP(l); err != nil {
		return Lease{}, err
	}
	if err := m.applyRules(ctx); err != nil {
		return Lease{}, err
	}
	return l, nil
}

func (m *Manager) appIndex(app string) (int, error) {
	if idx, ok := m.st.Apps[app]; ok {
		return idx, nil
	}
	used := map[int]bool{}
	for _, i := range m.st.Apps {
		used[i] = true
	}
	// A /24 the host already routes (another kiln data directory's apps, a VPN) would
	// shadow that route or be shadowed by it: its machines get "no route to host".
	routes, err := hostRoutes()
	if err != nil {
		return 0, err
	}
	if i, ok := pickSubnet(m.cfg.Pool, used, routes); ok {
		m.st.Apps[app] = i
		return i, nil
	}
	return 0, errdefs.New(errdefs.ErrCapacity, "the network pool %s has no /24 left for app %s: %d apps have one and the host routes the rest; give kiln a larger pool (--network-pool)", m.cfg.Pool, app, len(used))
}

func (m *Manager) freeHost(app string) (int, error) {
	used := map[int]bool{}
	for _, ms := range m.st.Machines {
		if ms.App == app {
			used[ms.Host] = true
		}
	}
	for h := 2; h < 255; h++ {
		if !used[h] {
			return h, nil
		}
	}
	return 0, errdefs.New(errdefs.ErrCapacity, "app %s has 253 machines on its network, the most a /24 holds; destroy some first", app)
}

// Detach removes a machine's TAP device and frees its address; an app's bridge and
// resolver go with its last machine.
func (m *Manager) Detach(ctx context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	ms, ok := m.st.Machines[id]
	if !ok {
		return nil
	}
	l := m.lease(id, ms)
	if err := deleteLink(l.TAP); err != nil {
		return err
	}
	delete(m.st.Machines, id)
	if !m.appInUse(ms.App) {
		if err := m.removeApp(ms.App); err != nil {
			return err
		}
	}
	if err := m.save(); err != nil {
		return err
	}
	return m.applyRules(ctx)
}

func (m *Manager) appInUse(app string) bool {
	for _, ms := range m.st.Machines {
		if ms.App == app {
			return true
		}
	}
	return false
}

func (m *Manager) removeApp(app string) error {
	idx := m.st.Apps[app]
	if r := m.resolvers[app]; r != nil {
		r.Close()
		delete(m.resolvers, app)
	}
	if err := deleteLink(m.bridgeName(idx)); err != nil {
		return err
	}
	delete(m.st.Apps, app)
	return nil
}

// Reconcile makes the host match the state after a (re)start: machines keep reports
// whether a machine still exists; those that do not lose their lease. Devices with
// kiln's prefix that no lease accounts for are deleted, and the rules are rewritten.
func (m *Manager) Reconcile(ctx context.Context, keep func(id string) bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for id := range m.st.Machines {
		if !keep(id) {
			delete(m.st.Machines, id)
		}
	}
	for app := range m.st.Apps {
		if !m.appInUse(app) {
			delete(m.st.Apps, app)
		}
	}
	if err := m.save(); err != nil {
		return err
	}
	want := map[string]bool{}
	for app, idx := range m.st.Apps {
		want[m.bridgeName(idx)] = true
		if err := m.ensureApp(app); err != nil {
			return err
		}
	}
	for id, ms := range m.st.Machines {
		l := m.lease(id, ms)
		want[l.TAP] = true
		if err := m.ensureTAP(l); err != nil {
			return err
		}
	}
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("listing network devices: %w", err)
	}
	for _, l := range links {
		if name := l.Attrs().Name; m.ownsLink(name) && !want[name] {
			m.logf("removing %s: no machine owns it", name)
			if err := netlink.LinkDel(l); err != nil {
				return fmt.Errorf("removing %s: %w", name, err)
			}
		}
	}
	return m.applyRules(ctx)
}

// ensureApp creates the app's bridge with its gateway address, and its resolver.
func (m *Manager) ensureApp(app string) error {
	idx := m.st.Apps[app]
	name := m.bridgeName(idx)
	link, err := netlink.LinkByName(name)
	if err != nil {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("creating bridge %s for app %s: %w", name, app, err)
		}
		if link, err = netlink.LinkByName(name); err != nil {
			return err
		}
	}
	gw := hostAddr(m.subnet(idx), 1)
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: gw.AsSlice(), Mask: net.CIDRMask(24, 32)}}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("address %s on %s: %w", gw, name, err)
	}
	noIPv6(name)
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bringing up %s: %w", name, err)
	}
	if m.resolvers[app] == nil {
		r, err := newResolver(gw, app, m)
		if err != nil {
			return err
		}
		m.resolvers[app] = r
	}
	return nil
}

func (m *Manager) ensureTAP(l Lease) error {
	br, err := netlink.LinkByName(m.bridgeName(m.st.Apps[l.App]))
	if err != nil {
		return fmt.Errorf("bridge of app %s: %w", l.App, err)
	}
	link, err := netlink.LinkByName(l.TAP)
	if err != nil {
		tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: l.TAP}, Mode: netlink.TUNTAP_MODE_TAP,
			Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE}
		if err := netlink.LinkAdd(tap); err != nil {
			if errors.Is(err, os.ErrPermission) {
				return errdefs.New(errdefs.ErrInvalid, "creating TAP device %s needs CAP_NET_ADMIN: run kiln server as root", l.TAP)
			}
			return fmt.Errorf("creating TAP device %s: %w", l.TAP, err)
		}
		if link, err = netlink.LinkByName(l.TAP); err != nil {
			return err
		}
	}
	noIPv6(l.TAP)
	if err := netlink.LinkSetMaster(link, br); err != nil {
		return fmt.Errorf("attaching %s to %s: %w", l.TAP, br.Attrs().Name, err)
	}
	return netlink.LinkSetUp(link)
}

func deleteLink(name string) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return err
	}
	if err := netlink.LinkDel(link); err != nil {
		return fmt.Errorf("removing %s: %w", name, err)
	}
	return nil
}

// Close stops the resolvers; devices and rules stay for the machines that keep running.
//
// With no machine left, it also removes kiln's table: the rules for kiln's confined
// users (the git user) apply host-wide, and must not outlive the server that wrote them.
// With machines left, the table stays for them until the next server adopts them.
func (m *Manager) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for app, r := range m.resolvers {
		r.Close()
		delete(m.resolvers, app)
	}
	if len(m.st.Machines) == 0 && len(m.st.Apps) == 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := nft(ctx, m.deleteTable()); err != nil {
			m.logf("removing table %s: %v", m.tableName(), err)
		}
	}
}

// appsSorted returns the apps with their indexes in a stable order.
func (m *Manager) appsSorted() []string {
	apps := make([]string, 0, len(m.st.Apps))
	for a := range m.st.Apps {
		apps = append(apps, a)
	}
	sort.Slice(apps, func(i, j int) bool { return m.st.Apps[apps[i]] < m.st.Apps[apps[j]] })
	return apps
}

// addrsOf lists the addresses of an app's machines, for its resolver.
func (m *Manager) resolve(app, name string) []netip.Addr {
	m.mu.Lock()
	defer m.mu.Unlock()
	suffix := "." + app + "." + m.cfg.DomainSuffix
	if !strings.HasSuffix(name, suffix) && name != app+"."+m.cfg.DomainSuffix {
		return nil
	}
	var out []netip.Addr
	for id, ms := range m.st.Machines {
		if ms.App != app {
			continue
		}
		if name == app+"."+m.cfg.DomainSuffix || name == id+".vm"+suffix {
			out = append(out, m.lease(id, ms).Addr.Addr())
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Less(out[j]) })
	return out
}

// noIPv6 turns IPv6 off on one of kiln's devices: app networks are IPv4 only, and the
// host must not take router advertisements from a guest.
func noIPv6(dev string) {
	os.WriteFile(filepath.Join("/proc/sys/net/ipv6/conf", dev, "disable_ipv6"), []byte("1\n"), 0o644)
}
