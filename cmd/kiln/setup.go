package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kilnhq/kiln/internal/assets"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/firecracker"
	"github.com/kilnhq/kiln/internal/vmm/qemu"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// initBinary finds kiln-init: KILN_INIT, or beside this executable.
func initBinary() string { return besideKiln("KILN_INIT", "kiln-init") }

// buildkitdBinary finds the buildkitd that builder VMs run: KILN_BUILDKITD, or beside
// this executable (`make build` puts it in bin/).
func buildkitdBinary() string { return besideKiln("KILN_BUILDKITD", "buildkitd") }

// besideKiln is $env if set, else name in this executable's directory if it is there.
func besideKiln(env, name string) string {
	if p := os.Getenv(env); p != "" {
		return p
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), name)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// drivers are the VMMs kiln runs. Firecracker (KILN_FIRECRACKER, else firecracker on
// PATH) runs under its jailer (KILN_JAILER, else jailer on PATH), its jails under
// DATA_DIR/jail: on the data dir's filesystem, as the VM's files are hard-linked into them.
func drivers(dataDir string) map[string]vmm.Driver {
	return map[string]vmm.Driver{
		"qemu": &qemu.Driver{},
		"firecracker": &firecracker.Driver{Binary: os.Getenv("KILN_FIRECRACKER"), Jailer: &firecracker.Jailer{
			Binary: os.Getenv("KILN_JAILER"), ChrootBase: filepath.Join(dataDir, "jail"),
		}, ConsoleLogger: consoleLogger()},
	}
}

// consoleLogger is `kiln console-log`, this binary's own, which keeps a Firecracker
// guest's console capped; nil if this executable cannot be found.
func consoleLogger() []string {
	exe, err := os.Executable()
	if err != nil {
		return nil
	}
	return []string{exe, "console-log"}
}

// consoleLogCmd reads a guest console on stdin into a capped log (vmm.CaptureConsole)
// until the VMM writing it exits. The Firecracker driver starts it; it is not for people.
func consoleLogCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "console-log FILE",
		Short:  "Keep a guest console read on stdin in FILE, capped (started by the Firecracker driver)",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			// Its own session already keeps a terminal's ^C away; a server's stop must
			// not end it either, or the VMM would lose its console's reader and exit.
			signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
			return vmm.CaptureConsole(os.Stdin, args[0])
		},
	}
}

// assetsDir is where guest assets are cached: KILN_ASSETS_DIR, or DATA_DIR/assets. Data
// dirs on one host can share one cache.
func assetsDir(dataDir string) string {
	if d := os.Getenv("KILN_ASSETS_DIR"); d != "" {
		return d
	}
	return filepath.Join(dataDir, "assets")
}

// reap removes what killed kiln processes left behind; every command that touches VMs
// calls it first.
func reap(ctx context.Context, dataDir string) {
	vmrun.Reap(ctx, dataDir, drivers(dataDir), os.Stderr)
}

// VMM choices: a driver's name, or VMMAuto.
const VMMAuto = "auto"

// runtime prepares a Runtime: assets present, driver chosen, accelerator resolved. The
// second result says in words what was chosen and why.
func runtime(ctx context.Context, dataDir, vmmName, kernel, modules string, log io.Writer) (*vmrun.Runtime, string, error) {
	all := drivers(dataDir)
	if _, ok := all[vmmName]; !ok && vmmName != VMMAuto {
		return nil, "", errdefs.Invalid("--vmm %q: use qemu, firecracker or auto", vmmName)
	}
	set, err := assets.Ensure(ctx, assets.Options{
		Dir:        assetsDir(dataDir),
		Kernel:     kernel,
		ModulesDir: modules,
		Init:       initBinary(),
		Log:        log,
	})
	if err != nil {
		return nil, "", err
	}
	// Whether KVM can run a guest is a property of the host, probed with QEMU, which
	// `make setup` installs everywhere; Firecracker needs it.
	probe := &vmrun.Runtime{DataDir: dataDir, Driver: all["qemu"], Assets: set}
	accel, why, err := probe.ResolveAccel(ctx, log)
	if err != nil {
		return nil, "", err
	}
	name := vmmName
	fcErr := firecrackerUsable(all["firecracker"].(*firecracker.Driver), set, accel, why)
	switch {
	case vmmName == "firecracker" && fcErr != nil:
		return nil, "", fcErr
	case vmmName == VMMAuto && fcErr == nil:
		name = "firecracker"
	case vmmName == VMMAuto:
		name = "qemu"
		fmt.Fprintf(log, "kiln: --vmm auto chose qemu: %v\n", fcErr)
	}
	rt := &vmrun.Runtime{DataDir: dataDir, Driver: all[name], Drivers: all, Assets: set, Accel: accel}
	return rt, fmt.Sprintf("%s, vmm %s, guest kernel %s", accel, name, set.KernelName) + " (" + why + ")", nil
}

// firecrackerUsable says why Firecracker cannot run this host's VMs, or nil: it needs
// its binary and jailer, a working KVM, and a kernel that finds virtio-mmio devices on
// its command line.
func firecrackerUsable(d *firecracker.Driver, set assets.Set, accel vmm.Accel, why string) error {
	if err := d.Available(); err != nil {
		return err
	}
	if accel != vmm.AccelKVM {
		return errdefs.New(errdefs.ErrMissingDependency, "--vmm firecracker needs a working KVM, and this host has none (%s): use --vmm qemu, which runs guests under software emulation", why)
	}
	if set.KernelName == assets.KernelDebian {
		return errdefs.New(errdefs.ErrMissingDependency, "--vmm firecracker cannot boot Debian's kernel (it lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES): build kiln's kernel with `make setup` (or `kiln assets build`) and drop --kernel debian")
	}
	return nil
}
