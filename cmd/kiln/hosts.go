package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

func limitsCmd(g *globals, af *apiFlags) *cobra.Command {
	c := &cobra.Command{Use: "limits", Short: "The limits the server enforces"}
	c.AddCommand(&cobra.Command{Use: "show", Short: "Every limit kiln enforces: its value and where it is set", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			ls, err := cl.Limits(cmd.Context())
			if err != nil {
				return err
			}
			fmt.Printf("%-28s  %-22s  %-32s  %s\n", "LIMIT", "VALUE", "SET BY", "WHAT")
			for _, l := range ls {
				v := l.Value
				if l.Unit != "" {
					v += " " + l.Unit
				}
				fmt.Printf("%-28s  %-22s  %-32s  %s\n", l.Name, v, l.Source, l.Description)
			}
			return nil
		}})
	return c
}

func drainCmd(g *globals, af *apiFlags) *cobra.Command {
	return &cobra.Command{Use: "drain HOST", Short: "Cordon a host and move its machines to other hosts; says what stayed and why", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			rep, err := cl.DrainHost(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			for _, m := range rep.Moved {
				fmt.Printf("moved  %s  to %s\n", m.Machine, m.To)
			}
			for _, m := range rep.Kept {
				fmt.Printf("kept   %s  %s\n", m.Machine, m.Why)
			}
			fmt.Fprintf(os.Stderr, "host %s is cordoned: %d machines moved, %d stayed\n", rep.Host, len(rep.Moved), len(rep.Kept))
			return nil
		}}
}

func hostCmd(g *globals, af *apiFlags) *cobra.Command {
	c := &cobra.Command{Use: "host", Aliases: []string{"hosts"}, Short: "Hosts and their capacity"}
	c.AddCommand(&cobra.Command{Use: "ls", Short: "Hosts: state, CPUs and memory (total, overcommit, reserved, offered, used)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			hs, err := cl.Hosts(cmd.Context())
			if err != nil {
				return err
			}
			fmt.Printf("%-16s  %-8s  %-32s  %s\n", "HOST", "STATE", "CPUS used/offered ((total−res)×ratio)", "MEMORY MiB used/offered ((total−res)×ratio)")
			for _, h := range hs {
				fmt.Printf("%-16s  %-8s  %-32s  %s\n", h.Name, h.State,
					fmt.Sprintf("%d/%d ((%d−%d)×%.3g)", h.CPUsUsed, h.CPUsOffered, h.CPUs, h.ReserveCPUs, h.CPUOvercommit),
					fmt.Sprintf("%d/%d ((%d−%d)×%.3g)", h.MemoryUsedMiB, h.MemoryOfferedMiB, h.MemoryMiB, h.ReserveMemoryMiB, h.MemoryOvercommit))
			}
			return nil
		}})
	for _, op := range []struct {
		use, short string
		cordon     bool
	}{{"cordon HOST", "Take no new work on a host", true}, {"uncordon HOST", "Take new work on a host again", false}} {
		c.AddCommand(&cobra.Command{Use: op.use, Short: op.short, Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				cl, err := af.client(g)
				if err != nil {
					return err
				}
				return cl.CordonHost(cmd.Context(), args[0], op.cordon)
			}})
	}
	c.AddCommand(drainCmd(g, af))
	return c
}
