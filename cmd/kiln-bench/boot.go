package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kilnhq/kiln/internal/assets"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// benchBoots boots kiln's guest kernel and the host's Debian kernel in turns, boots
// times each, and reports both: the targets compare them within one run.
func benchBoots(ctx context.Context, rt *vmrun.Runtime, init, dataDir string, boots int, spec vmrun.Spec, rep *report, add func(string, float64, string, string)) error {
	debian, err := assets.Ensure(ctx, assets.Options{Dir: filepath.Join(dataDir, "assets"), Init: init, Kernel: assets.KernelDebian, Log: os.Stderr})
	if err != nil {
		return fmt.Errorf("debian kernel: %w", err)
	}
	drt := *rt
	drt.Assets = debian
	type series struct{ total, vmmStart, kernel, init []time.Duration }
	var kiln, deb series
	var debRelease string
	for i := 0; i < boots; i++ {
		for _, k := range []struct {
			rt *vmrun.Runtime
			s  *series
		}{{rt, &kiln}, {&drt, &deb}} {
			inst, err := k.rt.Boot(ctx, spec)
			if err != nil {
				return fmt.Errorf("boot %d (%s kernel): %w", i, k.rt.Assets.KernelName, err)
			}
			if k.s == &kiln {
				rep.GuestKernel = inst.Agent.Hello.Kernel
			} else {
				debRelease = inst.Agent.Hello.Kernel
			}
			k.s.total = append(k.s.total, inst.Timing.Total)
			k.s.vmmStart = append(k.s.vmmStart, inst.Timing.VMMStart)
			k.s.kernel = append(k.s.kernel, inst.Timing.Kernel)
			k.s.init = append(k.s.init, inst.Timing.Init)
			fmt.Fprintf(os.Stderr, "boot %d, %s kernel: %s\n", i+1, k.rt.Assets.KernelName, inst.Timing.Total.Round(time.Millisecond))
			inst.Shutdown(ctx, 10*time.Second)
		}
	}
	kp, dp := pct(kiln.total, 0.5), pct(deb.total, 0.5)
	add("boot_to_agent_ready_p50", ms(kp), "ms", fmt.Sprintf("kiln's kernel (%s), %d boots", rep.GuestKernel, boots))
	add("boot_to_agent_ready_p95", ms(pct(kiln.total, 0.95)), "ms", "")
	add("boot_vmm_start_p50", ms(pct(kiln.vmmStart, 0.5)), "ms", "spawn QEMU until QMP answers")
	add("boot_kernel_p50", ms(pct(kiln.kernel, 0.5)), "ms", "guest clock at kiln-init start")
	add("boot_init_p50", ms(pct(kiln.init, 0.5)), "ms", "kiln-init: mounts, agent up, no modules (target: at most 100 ms)")
	add("boot_to_agent_ready_debian_p50", ms(dp), "ms", fmt.Sprintf("Debian's kernel (%s) in the same run, %d boots", debRelease, boots))
	add("boot_kernel_debian_p50", ms(pct(deb.kernel, 0.5)), "ms", "guest clock at kiln-init start")
	add("boot_init_debian_p50", ms(pct(deb.init, 0.5)), "ms", "kiln-init with Debian's modules to load")
	add("boot_kiln_of_debian", 100*float64(kp)/float64(dp), "%", "kiln's kernel's p50 as a share of Debian's (target: at most 40 %)")
	return nil
}
