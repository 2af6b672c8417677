package network

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Counters are a device's traffic counters, as the host's kernel keeps them.
type Counters struct {
	RxBytes, RxPackets, RxErrors, RxDropped uint64
	TxBytes, TxPackets, TxErrors, TxDropped uint64
}

// sysClassNet is where the kernel shows each device's counters.
const sysClassNet = "/sys/class/net"

// DeviceCounters reads a device's counters (a machine's TAP device, for /metrics).
func DeviceCounters(dev string) (Counters, error) {
	var c Counters
	if dev == "" || strings.ContainsAny(dev, "/") || dev == "." || dev == ".." {
		return c, os.ErrNotExist
	}
	dir := filepath.Join(sysClassNet, dev, "statistics")
	for name, dst := range map[string]*uint64{
		"rx_bytes": &c.RxBytes, "rx_packets": &c.RxPackets, "rx_errors": &c.RxErrors, "rx_dropped": &c.RxDropped,
		"tx_bytes": &c.TxBytes, "tx_packets": &c.TxPackets, "tx_errors": &c.TxErrors, "tx_dropped": &c.TxDropped,
	} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return c, err
		}
		*dst, _ = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	}
	return c, nil
}
