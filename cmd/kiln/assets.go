package main

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/kilnhq/kiln/internal/assets"
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
	build := &cobra.Command{
		Use:   "build",
		Short: "Build (or find cached) guest assets; the root filesystem needs root and the Debian mirror",
		RunE: func(cmd *cobra.Command, _ []string) error {
			set, err := assets.Ensure(cmd.Context(), assets.Options{
				Dir:         assetsDir(g.dataDir),
				Kernel:      kernel,
				ModulesDir:  modules,
				Init:        initBinary(),
				Log:         os.Stderr,
				BuildRootfs: true,
				Mirror:      mirror,
			})
			if err != nil {
				return err
			}
			fmt.Printf("kernel     %s\ninitramfs  %s\nrootfs     %s\n", set.Kernel, set.Initramfs, set.Rootfs)
			return nil
		},
	}
	build.Flags().StringVar(&kernel, "kernel", "", "guest kernel (default: the host's Debian kernel)")
	build.Flags().StringVar(&modules, "modules", "", "kernel module tree for --kernel (default: none)")
	build.Flags().StringVar(&mirror, "mirror", os.Getenv("KILN_DEBIAN_MIRROR"), "Debian mirror for the root filesystem (env KILN_DEBIAN_MIRROR)")
	c.AddCommand(build)
	return c
}
