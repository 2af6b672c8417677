package main

import (
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
	var kernel, modules, mirror string
	var noBuilder bool
	build := &cobra.Command{
		Use:   "build",
		Short: "Build (or find cached) guest assets; the root filesystem needs root and the Debian mirror",
		RunE: func(cmd *cobra.Command, _ []string) error {
			o := assets.Options{
				Dir:         assetsDir(g.dataDir),
				Kernel:      kernel,
				ModulesDir:  modules,
				Init:        initBinary(),
				Log:         os.Stderr,
				BuildRootfs: true,
				Mirror:      mirror,
			}
			set, err := assets.Ensure(cmd.Context(), o)
			if err != nil {
				return err
			}
			fmt.Printf("kernel     %s\ninitramfs  %s\nrootfs     %s\n", set.Kernel, set.Initramfs, set.Rootfs)
			if noBuilder {
				return nil
			}
			bk := buildkitdBinary()
			if bk == "" {
				return errdefs.New(errdefs.ErrMissingDependency, "buildkitd not found beside kiln or in KILN_BUILDKITD: run `make build` (or pass --no-builder)")
			}
			builder, err := assets.EnsureBuilder(cmd.Context(), o, bk)
			if err != nil {
				return err
			}
			fmt.Printf("builder    %s\n", builder)
			return nil
		},
	}
	build.Flags().StringVar(&kernel, "kernel", "", "guest kernel (default: the host's Debian kernel)")
	build.Flags().StringVar(&modules, "modules", "", "kernel module tree for --kernel (default: none)")
	build.Flags().BoolVar(&noBuilder, "no-builder", false, "skip the builder root filesystem (buildkitd and runc)")
	build.Flags().StringVar(&mirror, "mirror", os.Getenv("KILN_DEBIAN_MIRROR"), "Debian mirror for the root filesystem (env KILN_DEBIAN_MIRROR)")
	c.AddCommand(build)
	return c
}
