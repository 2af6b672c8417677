package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/vmrun"
)

func vmCmd(g *globals) *cobra.Command {
	c := &cobra.Command{Use: "vm", Short: "Low-level microVM tools"}
	c.AddCommand(vmRunCmd(g))
	return c
}

type runFlags struct {
	cpus    int
	memory  int
	disks   []string
	env     []string
	workdir string
	vmm     string
	kernel  string
	modules string
	timeout time.Duration
	tty     bool
	verbose bool
	user    string
	image   string
}

func vmRunCmd(g *globals) *cobra.Command {
	var f runFlags
	c := &cobra.Command{
		Use:   "run [flags] [--image TARBALL] -- COMMAND [ARG...]",
		Short: "Boot a microVM, run one command in it, and remove the VM",
		Long: `Boot one microVM from the default root filesystem (or an image's, with --image;
then COMMAND defaults to the image's entrypoint and cmd), run COMMAND in it with stdin,
stdout and stderr attached, and exit with COMMAND's exit status. The VM and everything
made for it are removed on exit, on Ctrl-C and on SIGTERM; what a killed kiln left behind
is removed by the next kiln command.

Exit status: COMMAND's own; 127 if it does not exist in the guest; 128+N if signal N
killed it; 124 if --timeout expired; 1 or 2 if kiln itself failed.`,
		Example: `  kiln vm run -- sh -c 'echo hello from $(uname -r); exit 3'
  kiln disk create data.ext4 --size 1G
  kiln vm run --disk data.ext4:/data -- sh -c 'date >> /data/log; cat /data/log'`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 && f.image == "" {
				return errdefs.Invalid("no command given: kiln vm run -- COMMAND [ARG...]")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error { return runVM(cmd.Context(), g, f, args) },
	}
	fl := c.Flags()
	fl.IntVar(&f.cpus, "cpus", 1, "virtual CPUs (1 to the host's CPU count)")
	fl.IntVar(&f.memory, "memory", 512, "guest memory in MiB (128 to the host's memory less 256)")
	fl.StringArrayVar(&f.disks, "disk", nil, "attach an ext4 image read-write: FILE:/mount/point (repeatable)")
	fl.StringArrayVarP(&f.env, "env", "e", nil, "set an environment variable in the guest: K=V (repeatable)")
	fl.StringVarP(&f.workdir, "workdir", "w", "", "working directory of COMMAND in the guest")
	fl.StringVar(&f.vmm, "vmm", "qemu", "virtual machine monitor: qemu, firecracker, or auto (firecracker where it, its jailer and a working KVM exist, else qemu)")
	fl.StringVar(&f.kernel, "kernel", "", "guest kernel: kiln (kiln's own, built by `make setup`), debian (the host's, with its modules), or the path of an ELF vmlinux or XZ bzImage (default kiln, falling back to debian when it is not built)")
	fl.StringVar(&f.modules, "modules", "", "kernel module tree for --kernel, like /lib/modules/RELEASE (default: none, the kernel has virtio, ext4 and overlay built in)")
	fl.DurationVar(&f.timeout, "timeout", 0, "kill COMMAND after this long, e.g. 30s (default: no limit)")
	fl.BoolVarP(&f.tty, "tty", "t", false, "give COMMAND a terminal (stdin must be one)")
	fl.StringVarP(&f.user, "user", "u", "", "run as UID[:GID] in the guest (default root)")
	fl.StringVar(&f.image, "image", "", "boot the root filesystem of this image (a `docker save` or OCI layout tarball)")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "say which accelerator is used and how long each boot phase took")
	return c
}

func parseRunFlags(f runFlags) ([]vmrun.Mount, guest.ExecRequest, error) {
	var mounts []vmrun.Mount
	var req guest.ExecRequest
	for _, d := range f.disks {
		img, mp, ok := strings.Cut(d, ":")
		if !ok || img == "" || mp == "" {
			return nil, req, errdefs.Invalid("--disk %q: want FILE:/mount/point", d)
		}
		mounts = append(mounts, vmrun.Mount{Image: img, Path: mp})
	}
	for _, e := range f.env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return nil, req, errdefs.Invalid("--env %q: want KEY=VALUE", e)
		}
	}
	if f.workdir != "" && !strings.HasPrefix(f.workdir, "/") {
		return nil, req, errdefs.Invalid("--workdir %q must be an absolute path", f.workdir)
	}
	if f.timeout < 0 {
		return nil, req, errdefs.Invalid("--timeout must not be negative")
	}
	if f.user != "" {
		var uid, gid uint32
		n, _ := fmt.Sscanf(strings.Replace(f.user, ":", " ", 1), "%d %d", &uid, &gid)
		if n == 0 {
			return nil, req, errdefs.Invalid("--user %q: want a numeric UID or UID:GID", f.user)
		}
		if n == 1 {
			gid = uid
		}
		req.UID, req.GID = uid, gid
	}
	req.Env, req.Dir, req.TTY = f.env, f.workdir, f.tty
	req.TimeoutMS = f.timeout.Milliseconds()
	return mounts, req, nil
}

func runVM(ctx context.Context, g *globals, f runFlags, argv []string) error {
	mounts, req, err := parseRunFlags(f)
	if err != nil {
		return err
	}
	req.Argv = argv
	if len(argv) == 0 {
		argv = []string{"the image's command"}
	}
	// Check the disks before booting anything.
	if _, err := vmrun.ValidateMounts(mounts); err != nil {
		return err
	}
	if f.tty && !term.IsTerminal(int(os.Stdin.Fd())) {
		return errdefs.Invalid("--tty needs a terminal on stdin")
	}
	reap(ctx, g.dataDir)
	logw := discardUnless(f.verbose)
	rt, accel, err := runtime(ctx, g.dataDir, f.vmm, f.kernel, f.modules, logw)
	if err != nil {
		return err
	}
	var rootfs string
	if f.image != "" {
		r, err := imageRootfs(ctx, g.dataDir, f.image, os.Stderr)
		if err != nil {
			return err
		}
		rootfs = r.Path
		req = withImageDefaults(req, r.Run, f)
		if len(req.Argv) == 0 {
			return errdefs.Invalid("image %s has no entrypoint or cmd: give a command after --", f.image)
		}
	}
	if f.verbose {
		fmt.Fprintf(os.Stderr, "kiln: accelerator %s\n", accel)
	}
	inst, err := rt.Boot(ctx, vmrun.Spec{Rootfs: rootfs, CPUs: f.cpus, MemoryMiB: f.memory, Mounts: mounts})
	if err != nil {
		if ctx.Err() != nil {
			return interrupted()
		}
		return err
	}
	// Whatever happens from here, the VM goes away; a cancelled ctx must not stop that.
	defer inst.Shutdown(context.WithoutCancel(ctx), 10*time.Second)
	if f.verbose {
		t := inst.Timing
		fmt.Fprintf(os.Stderr, "kiln: vm %s ready in %s (vmm start %s, kernel %s, init %s), guest kernel %s\n",
			inst.ID, t.Total.Round(time.Millisecond), t.VMMStart.Round(time.Millisecond),
			t.Kernel, t.Init, inst.Agent.Hello.Kernel)
	}
	pio := guest.IO{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	if f.tty {
		if old, err := term.MakeRaw(int(os.Stdin.Fd())); err == nil {
			defer term.Restore(int(os.Stdin.Fd()), old)
		}
		if ws, err := unix.IoctlGetWinsize(int(os.Stdout.Fd()), unix.TIOCGWINSZ); err == nil {
			req.Rows, req.Cols = ws.Row, ws.Col
		}
	}
	proc, err := inst.Agent.Start(ctx, req, pio)
	if err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			fmt.Fprintf(os.Stderr, "kiln: %v\n", err)
			return exitError{127}
		}
		if errors.Is(err, errdefs.ErrInvalid) {
			fmt.Fprintf(os.Stderr, "kiln: %v\n", err)
			return exitError{126}
		}
		return err
	}
	if f.tty {
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				if ws, err := unix.IoctlGetWinsize(int(os.Stdout.Fd()), unix.TIOCGWINSZ); err == nil {
					proc.Resize(ws.Row, ws.Col)
				}
			}
		}()
	}
	st, err := proc.Wait(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return interrupted()
		}
		return err
	}
	if st.TimedOut {
		fmt.Fprintf(os.Stderr, "kiln: %s timed out after %s and was killed\n", argv[0], f.timeout)
		return exitError{124}
	}
	if st.Signal != 0 {
		fmt.Fprintf(os.Stderr, "kiln: %s was killed by signal %s\n", argv[0], unix.SignalName(syscall.Signal(st.Signal)))
	}
	if st.Code != 0 {
		return exitError{st.Code}
	}
	return nil
}

// imageRootfs opens an image tarball and converts it (once per digest) to a root
// filesystem.
func imageRootfs(ctx context.Context, dataDir, tarball string, log io.Writer) (image.Rootfs, error) {
	img, closeImg, err := image.OpenTarball(tarball)
	if err != nil {
		return image.Rootfs{}, err
	}
	defer closeImg()
	return rootfsCache(dataDir, 0).Rootfs(ctx, img, log)
}

// withImageDefaults fills what the command line left open from the image's config, as
// `docker run` does: command, environment (the command line's entries win), working
// directory and user.
func withImageDefaults(req guest.ExecRequest, run image.Run, f runFlags) guest.ExecRequest {
	if len(req.Argv) == 0 {
		req.Argv = run.Argv
	}
	req.Env = append(append([]string{}, run.Env...), req.Env...)
	if req.Dir == "" {
		req.Dir = run.Dir
	}
	if f.user == "" {
		req.UID, req.GID = run.UID, run.GID
	}
	return req
}

func interrupted() error {
	fmt.Fprintln(os.Stderr, "kiln: interrupted; the VM was removed")
	return exitError{130}
}
