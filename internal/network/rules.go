package network

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// rules renders kiln's whole nftables table from the state. Applying it replaces the
// table in one transaction, so the rules are never half-written.
func (m *Manager) rules() string {
	var b strings.Builder
	t := m.tableName()
	all := "kb" + m.tag + "*"
	b.WriteString(m.deleteTable())
	fmt.Fprintf(&b, "table inet %s {\n", t)
	m.egressSets(&b)
	if m.outputWanted() {
		// The host's own processes that run for callers (git for `kiln build --git`), and
		// the VMMs' users, which send nothing.
		b.WriteString("\tchain output {\n\t\ttype filter hook output priority filter; policy accept;\n")
		if d := m.cfg.DenyUIDs; d[0] > 0 {
			fmt.Fprintf(&b, "\t\tmeta skuid %d-%d reject with icmpx type admin-prohibited\n", d[0], d[1])
		}
		confinedRules(&b, m.cfg.ConfineUIDs)
		b.WriteString("\t}\n")
	}
	if len(m.st.Apps) == 0 {
		b.WriteString("}\n")
		return b.String()
	}
	// Traffic to the host itself: replies to what the host opened (the proxy, health
	// checks) and DNS to the machine's own gateway, nothing else: no host service, no
	// other app's gateway, no forged source address, no IPv6 (router advertisements
	// from a guest could otherwise route the host through it).
	b.WriteString("\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n")
	fmt.Fprintf(&b, "\t\tiifname %q meta nfproto ipv6 drop\n", all)
	for _, app := range m.appsSorted() {
		idx := m.st.Apps[app]
		sub := m.subnet(idx)
		fmt.Fprintf(&b, "\t\tiifname %q ip saddr != %s drop\n", m.bridgeName(idx), sub)
		fmt.Fprintf(&b, "\t\tiifname %q ip daddr %s meta l4proto { tcp, udp } th dport 53 accept\n", m.bridgeName(idx), hostAddr(sub, 1))
	}
	fmt.Fprintf(&b, "\t\tiifname %q ct state established,related accept\n", all)
	fmt.Fprintf(&b, "\t\tiifname %q drop\n", all)
	b.WriteString("\t}\n")
	// Routed traffic: within one app it is bridged and never gets here (unless
	// br_netfilter is loaded, hence the first rule); between apps it is dropped; out of
	// the pool it is allowed when egress is on, to the internet only (egress.go); in from
	// outside only as replies.
	b.WriteString("\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n")
	fmt.Fprintf(&b, "\t\tiifname %q meta nfproto ipv6 drop\n", all)
	fmt.Fprintf(&b, "\t\toifname %q meta nfproto ipv6 drop\n", all)
	for _, app := range m.appsSorted() {
		idx := m.st.Apps[app]
		br := m.bridgeName(idx)
		fmt.Fprintf(&b, "\t\tiifname %q ip saddr != %s drop\n", br, m.subnet(idx))
		fmt.Fprintf(&b, "\t\tiifname %q oifname %q accept\n", br, br)
	}
	fmt.Fprintf(&b, "\t\tiifname %q oifname %q drop\n", all, all)
	fmt.Fprintf(&b, "\t\toifname %q ct state established,related accept\n", all)
	fmt.Fprintf(&b, "\t\toifname %q drop\n", all)
	if m.cfg.EgressOff {
		fmt.Fprintf(&b, "\t\tiifname %q drop\n", all)
	} else {
		egressRules(&b, all)
	}
	b.WriteString("\t}\n")
	if !m.cfg.EgressOff {
		// Only routed traffic from machines: the host's own traffic to a gateway address
		// (the proxy, a resolver) keeps its address.
		b.WriteString("\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n")
		if m.cfg.Egress.IsValid() {
			fmt.Fprintf(&b, "\t\tiifname %q oifname != %q snat ip to %s\n", all, all, m.cfg.Egress)
		} else {
			fmt.Fprintf(&b, "\t\tiifname %q oifname != %q masquerade\n", all, all)
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

// tableWanted reports whether kiln's table should exist: for apps' networks, or for the
// confined users' rules.
func (m *Manager) tableWanted() bool { return len(m.st.Apps) > 0 || m.outputWanted() }

// outputWanted reports whether some host users' own traffic has rules.
func (m *Manager) outputWanted() bool { return len(m.cfg.ConfineUIDs) > 0 || m.cfg.DenyUIDs[0] > 0 }

// applyRules writes the table; with nothing left for it to hold it removes it.
func (m *Manager) applyRules(ctx context.Context) error {
	script := m.rules()
	if !m.tableWanted() {
		script = m.deleteTable()
	} else if len(m.st.Apps) > 0 && !m.cfg.EgressOff {
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644); err != nil {
			return fmt.Errorf("turning on IPv4 forwarding for machines' egress: %w", err)
		}
	}
	return nft(ctx, script)
}

// deleteTable is the script that removes kiln's table, whether or not it exists.
func (m *Manager) deleteTable() string {
	t := m.tableName()
	return fmt.Sprintf("table inet %s\ndelete table inet %s\n", t, t)
}

func nft(ctx context.Context, script string) error {
	cmd := exec.CommandContext(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("nft: %v: %s", err, strings.TrimSpace(out.String()))
	}
	return nil
}

// RemoveAll deletes every device and rule this manager made, and forgets all leases.
// The server does not call it (machines keep their network across restarts); it is for
// tearing a host down.
func (m *Manager) RemoveAll(ctx context.Context) error {
	if err := m.Reconcile(ctx, func(string) bool { return false }); err != nil {
		return err
	}
	return nft(ctx, m.deleteTable()) // the confined users' rules too
}
