package network

import "testing"

// The loopback device every host has reads back its counters; a name that could leave
// the directory is refused.
func TestDeviceCounters(t *testing.T) {
	if _, err := DeviceCounters("lo"); err != nil {
		t.Fatalf("lo: %v", err)
	}
	for _, bad := range []string{"", "..", "../lo", "nosuchdev0"} {
		if _, err := DeviceCounters(bad); err == nil {
			t.Errorf("%q read", bad)
		}
	}
}
