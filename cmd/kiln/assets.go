package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/kilnhq/kiln/internal/assets"
	"github.com/kilnhq/kiln/internal/errdefs"
)

func discardUnless(v bool) io.Writer {
	if v {
		return os.Stderr
	}
	return io.Discard
}

func assetsCmd(g *globals) *cobra.Command {
	c := &cobra.Command{Use: "assets", Short: "Guest kernel, initramfs and root filesystem"}
	var kernel, modules, mirror, kernelConfig string
	var noBuilder bool
	var jobs int
	build := &cobra.Command{
		Use:   "build",
		Short: "Build (or find cached) guest assets; the root filesystem needs root and the Debian mirror",
		RunE: func(cmd *cobra.Command, _ []string) error {
			if kernelConfig != "" {
				// An operator's own config: built and named, booted with --kernel PATH.
				b, err := os.ReadFile(kernelConfig)
				if err != nil {
					return errdefs.Wrap(errdefs.ErrInvalid, err, "--kernel-config")
				}
				p, err := assets.BuildKernel(cmd.Context(), assets.KernelBuild{Dir: assetsDir(g.dataDir), Config: b, ConfigName: kernelConfig, Jobs: jobs, Log: os.Stderr})
				if err != nil {
					return err
				}
				fmt.Printf("kernel     %s (boot it with --kernel %s)\n", p, p)
				return nil
			}
			o := assets.Options{
				Dir:         assetsDir(g.dataDir),
				Kernel:      kernel,
				ModulesDir:  modules,
				Init:        initBinary(),
				Log:         os.Stderr,
				BuildRootfs: true,
				BuildKernel: kernel == "" || kernel == assets.KernelKiln,
				KernelJobs:  jobs,
				Mirror:      mirror,
			}
			var bk string
			if !noBuilder {
				if bk = buildkitdBinary(); bk == "" {
					return errdefs.New(errdefs.ErrMissingDependency, "buildkitd not found beside kiln or in KILN_BUILDKITD: run `make build` (or pass --no-builder)")
				}
			}
			// The builder's root filesystem (debootstrap: mostly the mirror and the disk)
			// is made while the kernel compiles.
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			type built struct {
				path string
				err  error
			}
			builderc := make(chan built, 1)
			if !noBuilder {
				go func() {
					p, err := assets.EnsureBuilder(ctx, o, bk)
					builderc <- built{p, err}
				}()
			}
			set, err := assets.Ensure(ctx, o)
			if err != nil {
				cancel()
				if !noBuilder {
					<-builderc
				}
				return err
			}
			fmt.Printf("kernel     %s (%s)\ninitramfs  %s\nrootfs     %s\n", set.Kernel, set.KernelName, set.Initramfs, set.Rootfs)
			if noBuilder {
				return nil
			}
			b := <-builderc
			if b.err != nil {
				return b.err
			}
			builder := b.path
			fmt.Printf("builder    %s\n", builder)
			return nil
		},
	}
	build.Flags().StringVar(&kernel, "kernel", "", "guest kernel: kiln (built from Debian's linux-source with kiln's config, cached by the config's hash), debian (the host's, with its modules) or the path of a vmlinux (default kiln)")
	build.Flags().StringVar(&kernelConfig, "kernel-config", "", "build a guest kernel from this config fragment (applied on allnoconfig, like internal/assets/kernel/kiln-6.1.config) and print its path; nothing else is built")
	build.Flags().IntVar(&jobs, "jobs", 0, "make -j for the kernel build (default: the number of CPUs)")
	build.Flags().StringVar(&modules, "modules", "", "kernel module tree for --kernel (default: none)")
	build.Flags().BoolVar(&noBuilder, "no-builder", false, "skip the builder root filesystem (buildkitd and runc)")
	build.Flags().StringVar(&mirror, "mirror", os.Getenv("KILN_DEBIAN_MIRROR"), "Debian mirror for the root filesystem (env KILN_DEBIAN_MIRROR)")
	c.AddCommand(build)
	return c
}
