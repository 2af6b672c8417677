package main

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
)

// netConfig is one interface as the host assigned it.
type netConfig struct {
	mac     net.HardwareAddr
	addr    netip.Prefix
	gateway netip.Addr
}

func parseNet(v string) (netConfig, error) {
	parts := strings.Split(v, ",")
	bad := fmt.Errorf("bad kiln.net=%q: want MAC,ADDR/PREFIX,GATEWAY", v)
	if len(parts) != 3 {
		return netConfig{}, bad
	}
	mac, err := net.ParseMAC(parts[0])
	if err != nil {
		return netConfig{}, bad
	}
	addr, err := netip.ParsePrefix(parts[1])
	if err != nil {
		return netConfig{}, bad
	}
	gw, err := netip.ParseAddr(parts[2])
	if err != nil {
		return netConfig{}, bad
	}
	return netConfig{mac: mac, addr: addr, gateway: gw}, nil
}

// setupNetwork gives each interface the host named its address and the default route,
// and writes the resolver configuration. It runs after the root is in place.
func setupNetwork(cfg config) error {
	for _, n := range cfg.nets {
		link, err := linkByMAC(n.mac, 5*time.Second)
		if err != nil {
			return err
		}
		ip := n.addr.Addr().AsSlice()
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: ip, Mask: net.CIDRMask(n.addr.Bits(), 32)}}
		if err := netlink.AddrAdd(link, addr); err != nil {
			return fmt.Errorf("address %s on %s: %w", n.addr, link.Attrs().Name, err)
		}
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("bringing up %s: %w", link.Attrs().Name, err)
		}
		route := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: n.gateway.AsSlice()}
		if err := netlink.RouteAdd(route); err != nil {
			return fmt.Errorf("default route via %s: %w", n.gateway, err)
		}
	}
	if cfg.dns != "" {
		conf := "nameserver " + cfg.dns + "\n"
		if cfg.search != "" {
			conf += "search " + cfg.search + "\n"
		}
		os.Remove("/etc/resolv.conf") // may be a symlink into a directory the image lacks
		os.MkdirAll("/etc", 0o755)       // an image FROM scratch has none
		if err := os.WriteFile("/etc/resolv.conf", []byte(conf), 0o644); err != nil {
			return fmt.Errorf("writing /etc/resolv.conf: %w", err)
		}
	}
	if cfg.hostname != "" {
		hosts := "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
		for _, n := range cfg.nets {
			hosts += n.addr.Addr().String() + "\t" + cfg.hostname
			if cfg.search != "" {
				hosts += " " + cfg.hostname + "." + cfg.search
			}
			hosts += "\n"
		}
		if len(cfg.nets) == 0 {
			hosts += "127.0.1.1\t" + cfg.hostname + "\n"
		}
		os.WriteFile("/etc/hosts", []byte(hosts), 0o644)
	}
	return nil
}

// linkByMAC waits for the interface with the given MAC: virtio-net may probe after init
// starts.
func linkByMAC(mac net.HardwareAddr, timeout time.Duration) (netlink.Link, error) {
	deadline := time.Now().Add(timeout)
	for {
		links, err := netlink.LinkList()
		if err == nil {
			for _, l := range links {
				if l.Attrs().HardwareAddr.String() == mac.String() {
					return l, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no network interface with MAC %s appeared within %s (is virtio_net in the initramfs?)", mac, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
