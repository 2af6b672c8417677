// Command kiln is kiln's one binary: the low-level VM tools today, the server and the
// API client as they land.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// exitError carries an exit code through cobra without printing anything more.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

type globals struct {
	dataDir string
}

func defaultDataDir() string {
	if d := os.Getenv("KILN_DATA_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/lib/kiln"
	}
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "kiln")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".local", "share", "kiln")
}

func main() {
	g := &globals{}
	root := &cobra.Command{
		Use:           "kiln",
		Short:         "kiln runs builds and machines in microVMs on your own hosts",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.dataDir, "data-dir", defaultDataDir(), "where kiln keeps assets, disks and VM state (env KILN_DATA_DIR)")
	af := &apiFlags{}
	af.register(root)
	root.AddCommand(vmCmd(g), assetsCmd(g), diskCmd(g), versionCmd(), serverCmd(g), buildCmd(g, af),
		machineCmd(g, af), logsCmd(g, af), imageCmd(g, af), volumeCmd(g, af), limitsCmd(g, af), hostCmd(g, af),
		tokensCmd(g, af), auditCmd(g, af), eventsCmd(g, af),
		deployCmd(g, af), planCmd(g, af), releasesCmd(g, af), rollbackCmd(g, af), scaleCmd(g, af), secretsCmd(g, af),
		consoleLogCmd())

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := root.ExecuteContext(ctx)
	stop()
	if err == nil {
		return
	}
	var ee exitError
	if errors.As(err, &ee) {
		os.Exit(ee.code)
	}
	fmt.Fprintf(os.Stderr, "kiln: %v\n", err)
	os.Exit(exitCode(err))
}

// exitCode is the CLI's one mapping from an error's kind to an exit status: 2 for what
// the user must change (a bad argument, a missing tool, something kiln does not do), 130
// for an interrupt, 1 for the rest. It goes by kind, and the client gives a server's
// error its kind back through errdefs' status table, so a failure exits the same whether
// it happened here or on the server. Kinds that share a status (501: missing dependency
// and not implemented) must share an exit status, as the client cannot tell them apart.
func exitCode(err error) int {
	if errors.Is(err, context.Canceled) {
		return 130
	}
	switch errdefs.KindOf(err) {
	case errdefs.ErrInvalid, errdefs.ErrMissingDependency, errdefs.ErrNotImplemented:
		return 2
	}
	return 1
}

var version = "dev"

func versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print kiln's version",
		Run:   func(*cobra.Command, []string) { fmt.Println("kiln", version) },
	}
}
