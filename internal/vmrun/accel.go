package vmrun

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/vmm"
)

// ProbeTimeout bounds the KVM probe boot. A guest under working KVM answers in well
// under a second; a nested or paravirtual KVM that cannot run a stock kernel hangs.
var ProbeTimeout = 20 * time.Second

// ResolveAccel decides between KVM and software emulation. KILN_ACCEL=kvm|tcg forces a
// choice. Otherwise, if /dev/kvm opens, one VM is booted under KVM; only if its agent
// answers is KVM used. The verdict is cached per host kernel, VMM and guest kernel, so
// the probe runs once (the verdict sits in the asset cache). The returned string says how the choice was made.
func (rt *Runtime) ResolveAccel(ctx context.Context, log io.Writer) (vmm.Accel, string, error) {
	switch v := os.Getenv("KILN_ACCEL"); v {
	case "kvm", "tcg":
		return vmm.Accel(v), "forced by KILN_ACCEL", nil
	case "":
	default:
		return "", "", errdefs.Invalid("KILN_ACCEL=%q: use kvm or tcg, or unset it to probe", v)
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return vmm.AccelTCG, fmt.Sprintf("/dev/kvm unusable (%v)", err), nil
	}
	f.Close()
	osr, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	cache := filepath.Join(filepath.Dir(rt.Assets.Initramfs), "accel-"+strings.TrimSpace(string(osr))+"-"+rt.Driver.Name()+"-"+filepath.Base(rt.Assets.Kernel))
	if b, err := os.ReadFile(cache); err == nil {
		a, why, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
		if a == string(vmm.AccelKVM) || a == string(vmm.AccelTCG) {
			return vmm.Accel(a), why + ", cached", nil
		}
	}
	fmt.Fprintf(log, "kiln: probing whether KVM can run a guest (once per host)\n")
	probe := *rt
	probe.Accel, probe.BootTimeout = vmm.AccelKVM, ProbeTimeout
	inst, err := probe.Boot(ctx, Spec{CPUs: 1, MemoryMiB: 256})
	verdict, why := vmm.AccelKVM, "probe boot under KVM succeeded"
	if err != nil {
		verdict, why = vmm.AccelTCG, "probe boot under KVM failed; using software emulation"
	}
	if inst != nil {
		inst.Destroy(context.WithoutCancel(ctx))
	}
	if ctx.Err() != nil {
		return "", "", ctx.Err()
	}
	atomicfile.WriteFile(cache, []byte(string(verdict)+"\n"+why+"\n"), 0o644)
	return verdict, why, nil
}
