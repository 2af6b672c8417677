package qemu_test

import (
	"os"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/testutil"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/qemu"
	"github.com/kilnhq/kiln/internal/vmm/vmmtest"
	"github.com/kilnhq/kiln/internal/vmrun"
)

func TestMain(m *testing.M) {
	os.Exit(testutil.Finish(m.Run()))
}

func TestConformance(t *testing.T) {
	testutil.RequireQEMU(t)
	vmmtest.Run(t, func(t *testing.T) *vmrun.Runtime {
		return testutil.Runtime(t, &qemu.Driver{})
	}, vmmtest.Options{})
}

func TestArgs(t *testing.T) {
	cfg := vmm.Config{ID: "x", Dir: "/d", CPUs: 2, MemoryMiB: 300, Kernel: "/k", Initramfs: "/i",
		Cmdline: "kiln.root=abc", Disks: []vmm.Disk{{Path: "/r", ReadOnly: true}, {Path: "/data"}},
		NICs: []vmm.NIC{{HostDev: "tap0", MAC: "06:00:00:00:00:01"}}}
	for _, tc := range []struct {
		accel vmm.Accel
		want  []string
	}{
		{vmm.AccelTCG, []string{"-accel tcg", "-cpu max", "tsc_early_khz=2000000", "reboot=t kiln.root=abc"}},
		{vmm.AccelKVM, []string{"-accel kvm", "-cpu host"}},
	} {
		cfg.Accel = tc.accel
		got := strings.Join(qemu.Args(cfg), " ")
		for _, w := range append(tc.want, "-smp 2", "-m 300M", "-no-reboot", "file=/r,format=raw,if=none,readonly=on", "id=disk1,file=/data,format=raw,if=none -device",
			"-netdev tap,id=net0,ifname=tap0,script=no,downscript=no -device virtio-net-device,netdev=net0,mac=06:00:00:00:00:01") {
			if !strings.Contains(got, w) {
				t.Errorf("%s: args lack %q:\n%s", tc.accel, w, got)
			}
		}
	}
}
