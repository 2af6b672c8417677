package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/volume"
)

// parseSize reads sizes like 512M, 1G, 1GiB, or a plain byte count.
func parseSize(s string) (int64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "IB"), "B")
	mult := int64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult, t = 1<<10, t[:n-1]
		case 'M':
			mult, t = 1<<20, t[:n-1]
		case 'G':
			mult, t = 1<<30, t[:n-1]
		case 'T':
			mult, t = 1<<40, t[:n-1]
		}
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v <= 0 {
		return 0, errdefs.Invalid("size %q: want a positive size like 512M or 1G", s)
	}
	return v * mult, nil
}

func diskCmd(g *globals) *cobra.Command {
	c := &cobra.Command{Use: "disk", Short: "ext4 disk images for VMs"}
	locks := func() volume.Locks { return volume.Locks{Dir: filepath.Join(g.dataDir, "locks")} }
	var size string
	create := &cobra.Command{
		Use: "create FILE --size SIZE", Short: "Create an ext4 disk image (sparse)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := parseSize(size)
			if err != nil {
				return err
			}
			if err := volume.Create(cmd.Context(), args[0], n, ""); err != nil {
				return err
			}
			fmt.Println(args[0])
			return nil
		},
	}
	create.Flags().StringVar(&size, "size", "1G", "size, e.g. 512M or 10G")
	extend := &cobra.Command{
		Use: "extend FILE --size SIZE", Short: "Grow a disk image that no VM has attached", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := parseSize(size)
			if err != nil {
				return err
			}
			reap(cmd.Context(), g.dataDir)
			l, err := locks().Acquire(args[0], "kiln disk extend")
			if err != nil {
				return err
			}
			defer l.Release()
			return volume.Extend(cmd.Context(), args[0], n)
		},
	}
	extend.Flags().StringVar(&size, "size", "", "new size, larger than the current one")
	var asJSON bool
	info := &cobra.Command{
		Use: "info FILE", Short: "Show a disk image's UUID, size and usage", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			i, err := volume.Inspect(args[0])
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(os.Stdout).Encode(map[string]any{
					"path": args[0], "uuid": i.UUID, "total_bytes": i.Total, "used_bytes": i.Used, "file_bytes": i.FileSize})
			}
			fmt.Printf("path   %s\nuuid   %s\nused   %d MiB of %d MiB (%.1f%%)\n", args[0], i.UUID,
				i.Used>>20, i.Total>>20, 100*float64(i.Used)/float64(max(i.Total, 1)))
			return nil
		},
	}
	info.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	rm := &cobra.Command{
		Use: "rm FILE", Short: "Delete a disk image that no VM has attached", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			reap(cmd.Context(), g.dataDir)
			l, err := locks().Acquire(args[0], "kiln disk rm")
			if err != nil {
				return err
			}
			defer l.Release()
			return volume.Delete(args[0])
		},
	}
	c.AddCommand(create, extend, info, rm)
	return c
}
