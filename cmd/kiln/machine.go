package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/errdefs"
)

type apiFlags struct {
	url, token string
}

func (a *apiFlags) register(c *cobra.Command) {
	c.PersistentFlags().StringVar(&a.url, "api-url", os.Getenv("KILN_API_URL"), "kiln server URL (env KILN_API_URL, config api_url; default http://"+DefaultListen+")")
	c.PersistentFlags().StringVar(&a.token, "token", os.Getenv("KILN_API_TOKEN"), "API token (env KILN_API_TOKEN, config token; default: DATA_DIR/admin-token when readable)")
}

// cliConfig is ~/.config/kiln/config.toml (or $KILN_CONFIG): defaults for the flags.
type cliConfig struct {
	APIURL string `toml:"api_url"`
	Token  string `toml:"token"`
}

func configPath() string {
	if p := os.Getenv("KILN_CONFIG"); p != "" {
		return p
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		return ""
	}
	return filepath.Join(dir, "kiln", "config.toml")
}

// client finds the server and token: flags, then environment, then the config file,
// then (for the token) DATA_DIR/admin-token when this user can read it.
func (a *apiFlags) client(g *globals) (*client.Client, error) {
	var cfg cliConfig
	if p := configPath(); p != "" {
		if md, err := toml.DecodeFile(p, &cfg); err == nil {
			if keys := md.Undecoded(); len(keys) > 0 {
				return nil, errdefs.Invalid("%s: unknown setting %q: the settings are api_url and token", p, keys[0].String())
			}
		} else if !os.IsNotExist(err) {
			return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "%s", p)
		}
	}
	url, tok := a.url, a.token
	if url == "" {
		url = cfg.APIURL
	}
	if url == "" {
		url = "http://" + DefaultListen
	}
	if tok == "" {
		tok = cfg.Token
	}
	if tok == "" {
		if b, err := os.ReadFile(filepath.Join(g.dataDir, "admin-token")); err == nil {
			tok = strings.TrimSpace(string(b))
		}
	}
	return client.New(url, tok), nil
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func machineCmd(g *globals, af *apiFlags) *cobra.Command {
	c := &cobra.Command{Use: "machine", Aliases: []string{"machines", "m"}, Short: "Machines: microVMs that run an image"}
	var (
		app, name, restart string
		cpus, memory, max  int
		env, volumes       []string
		autoDestroy        bool
		ports              []string
		autostop           string
		autostart          bool
		minRunning         int
		noWait, detach     bool
		waitFor            time.Duration
	)
	run := &cobra.Command{
		Use:   "run IMAGE [-- COMMAND...]",
		Short: "Create and start a machine; prints its ID on the last line",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			if app == "" {
				return errdefs.Invalid("--app is required: the app the machine belongs to")
			}
			cfg := api.MachineConfig{Image: args[0], Guest: api.Guest{CPUs: cpus, MemoryMB: memory},
				Restart: api.Restart{Policy: restart, MaxRetries: max}, AutoDestroy: autoDestroy}
			if len(args) > 1 {
				cfg.Init.Cmd = args[1:]
			}
			for _, v := range volumes {
				name, path, ok := strings.Cut(v, ":")
				if !ok || name == "" || path == "" {
					return errdefs.Invalid("--volume %q: want NAME:/path", v)
				}
				cfg.Mounts = append(cfg.Mounts, api.Mount{Volume: name, Path: path})
			}
			for _, e := range env {
				k, v, ok := strings.Cut(e, "=")
				if !ok || k == "" {
					return errdefs.Invalid("-e %q: want KEY=VALUE", e)
				}
				if cfg.Env == nil {
					cfg.Env = map[string]string{}
				}
				cfg.Env[k] = v
			}
			for _, p := range ports {
				svc, err := parsePort(p)
				if err != nil {
					return err
				}
				svc.Autostop, svc.MinMachinesRunning = api.Autostop(autostop), minRunning
				if cmd.Flags().Changed("autostart") {
					svc.Autostart = &autostart
				}
				cfg.Services = append(cfg.Services, svc)
			}
			if len(ports) == 0 && (autostop != "" || cmd.Flags().Changed("autostart") || minRunning != 0) {
				return errdefs.Invalid("--autostop, --autostart and --min-running apply to services: add --port PUBLIC:INTERNAL[/http]")
			}
			if err := cl.CreateApp(ctx, app); err != nil && !errors.Is(err, errdefs.ErrConflict) {
				return err
			}
			m, err := cl.CreateMachine(ctx, app, api.CreateMachineRequest{Name: name, Config: cfg, NoCapacityWait: noWait})
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "machine %s (%s) in app %s: %s\n", m.ID, m.Name, app, m.State)
			if !detach {
				if err := waitStarted(ctx, cl, app, m.ID, waitFor); err != nil {
					return err
				}
			}
			fmt.Println(m.ID)
			return nil
		},
	}
	run.Flags().StringVar(&app, "app", os.Getenv("KILN_APP"), "app (created if missing; env KILN_APP)")
	run.Flags().StringVar(&name, "name", "", "machine name (default: its ID)")
	run.Flags().IntVar(&cpus, "cpus", 1, "virtual CPUs")
	run.Flags().IntVar(&memory, "memory", 256, "memory in MiB")
	run.Flags().StringArrayVarP(&env, "env", "e", nil, "environment variable K=V (repeatable)")
	run.Flags().StringArrayVar(&volumes, "volume", nil, "mount a volume: NAME:/path (repeatable)")
	run.Flags().StringVar(&restart, "restart", "", "restart policy: no, always or on-failure")
	run.Flags().IntVar(&max, "max-retries", 0, "restarts allowed by on-failure (default 10)")
	run.Flags().BoolVar(&autoDestroy, "auto-destroy", false, "destroy the machine when its workload exits")
	run.Flags().StringArrayVarP(&ports, "port", "p", nil, "serve a port through kiln's proxy: PUBLIC:INTERNAL[/http] (repeatable); public port 80 is the proxy's HTTP listener")
	run.Flags().StringVar(&autostop, "autostop", "", "what the proxy does with the machine when idle: off, stop or suspend")
	run.Flags().BoolVar(&autostart, "autostart", false, "let a request start or resume the machine (default: on when --autostop is)")
	run.Flags().IntVar(&minRunning, "min-running", 0, "machines of the app that autostop leaves running")
	run.Flags().BoolVar(&noWait, "no-capacity-wait", false, "fail at once if the machine does not fit now, instead of waiting in the capacity queue")
	run.Flags().BoolVarP(&detach, "detach", "d", false, "return once the machine is created, without waiting for it to start")
	run.Flags().DurationVar(&waitFor, "wait-timeout", 5*time.Minute, "how long to wait for the machine to start (it goes on starting after)")

	var lsApp string
	var asJSON bool
	ls := &cobra.Command{
		Use: "ls --app APP", Short: "List an app's machines", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if lsApp == "" {
				return errdefs.Invalid("--app is required")
			}
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			ms, err := cl.ListMachines(cmd.Context(), lsApp)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(ms)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tSTATE\tIMAGE\tCREATED\tEXIT")
			for _, m := range ms {
				exit := ""
				if m.ExitCode != nil {
					exit = fmt.Sprint(*m.ExitCode)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.ID, m.Name, m.State, m.Config.Image, m.CreatedAt.Local().Format(time.DateTime), exit)
			}
			return tw.Flush()
		},
	}
	ls.Flags().StringVar(&lsApp, "app", os.Getenv("KILN_APP"), "app (env KILN_APP)")
	ls.Flags().BoolVar(&asJSON, "json", false, "print JSON with the API's field names")

	var execTTY, execInteractive bool
	var execTimeout time.Duration
	exec := &cobra.Command{
		Use: "exec ID -- COMMAND...", Short: "Run a command in a started machine, its input and output streamed", Args: cobra.MinimumNArgs(2),
		Long: "Run a command in a started machine, as its workload's user. Input and output are streamed, " +
			"any size; the command's exit status becomes kiln's. Stdin is passed on when it is not a terminal, " +
			"or with -i or -t. Ending kiln (Ctrl-C without -t) kills the command.",
		RunE: func(cmd *cobra.Command, args []string) error {
			return execMachine(cmd.Context(), af, g, args[0], args[1:], execTTY, execInteractive, execTimeout)
		},
	}
	exec.Flags().BoolVarP(&execTTY, "tty", "t", false, "run the command on a terminal (stdin must be one)")
	exec.Flags().BoolVarP(&execInteractive, "interactive", "i", false, "pass stdin on even when it is a terminal")
	exec.Flags().DurationVar(&execTimeout, "timeout", 0, "kill the command after this long (0: the server's exec.timeout_max, 1h by default, which is also the most it allows)")
	var force bool
	act := func(use, short string, f func(ctx context.Context, cl *client.Client, app, id string) error) *cobra.Command {
		return &cobra.Command{
			Use: use + " ID", Short: short, Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				cl, err := af.client(g)
				if err != nil {
					return err
				}
				app, m, err := cl.FindMachine(cmd.Context(), args[0])
				if err != nil {
					return err
				}
				if err := f(cmd.Context(), cl, app, m.ID); err != nil {
					return err
				}
				fmt.Fprintf(os.Stderr, "machine %s: %s\n", m.ID, use)
				return nil
			},
		}
	}
	start := act("start", "Start a stopped machine", func(ctx context.Context, cl *client.Client, app, id string) error { return cl.Start(ctx, app, id) })
	stop := act("stop", "Stop a machine", func(ctx context.Context, cl *client.Client, app, id string) error { return cl.Stop(ctx, app, id) })
	suspend := act("suspend", "Suspend a machine to disk; start resumes it", func(ctx context.Context, cl *client.Client, app, id string) error {
		return cl.Suspend(ctx, app, id)
	})
	restartCmd := act("restart", "Restart a machine", func(ctx context.Context, cl *client.Client, app, id string) error { return cl.Restart(ctx, app, id) })
	destroy := act("destroy", "Destroy a machine (--force stops it first)", func(ctx context.Context, cl *client.Client, app, id string) error {
		return cl.Destroy(ctx, app, id, force)
	})
	destroy.Flags().BoolVarP(&force, "force", "f", false, "stop a running machine first")
	var waitState string
	var waitTimeout time.Duration
	wait := act("wait", "Wait until a machine reaches --state", func(ctx context.Context, cl *client.Client, app, id string) error {
		return cl.Wait(ctx, app, id, waitState, waitTimeout)
	})
	wait.Flags().StringVar(&waitState, "state", "started", "state to wait for")
	wait.Flags().DurationVar(&waitTimeout, "timeout", 60*time.Second, "how long to wait")
	c.AddCommand(run, ls, exec, start, stop, suspend, restartCmd, destroy, wait)
	return c
}

func logsCmd(g *globals, af *apiFlags) *cobra.Command {
	var follow bool
	c := &cobra.Command{
		Use: "logs ID", Short: "Show a machine's workload output (-f to follow)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			app, m, err := cl.FindMachine(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return cl.Logs(cmd.Context(), app, m.ID, follow, func(l api.LogLine) error {
				w := os.Stdout
				if l.Stream == "stderr" {
					w = os.Stderr
				}
				_, err := fmt.Fprintf(w, "%s %s\n", l.Timestamp.Local().Format(time.RFC3339), l.Message)
				return err
			})
		},
	}
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output")
	return c
}

func imageCmd(g *globals, af *apiFlags) *cobra.Command {
	c := &cobra.Command{Use: "image", Short: "Images on the kiln server"}
	var ref string
	load := &cobra.Command{
		Use: "load FILE.tar", Short: "Load a `docker save` or OCI layout tarball into the server", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := os.Open(args[0])
			if errors.Is(err, fs.ErrNotExist) {
				return errdefs.Wrap(errdefs.ErrNotFound, err, "image tarball")
			} else if err != nil {
				return errdefs.Wrap(errdefs.ErrInvalid, err, "image tarball")
			}
			defer f.Close()
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			var body io.Reader = f
			if fi, err := f.Stat(); err == nil && term.IsTerminal(int(os.Stderr.Fd())) {
				bar := progressbar.DefaultBytes(fi.Size(), "uploading "+filepath.Base(args[0]))
				r := progressbar.NewReader(f, bar)
				body = &r
				defer bar.Finish()
			}
			res, err := cl.LoadImage(cmd.Context(), body, ref)
			if err != nil {
				// The server calls the file "the upload"; the user knows it by its path.
				return fmt.Errorf("loading %s: %w", args[0], err)
			}
			for _, r := range res.Refs {
				fmt.Printf("loaded %s (%s)\n", r, res.Digest)
			}
			return nil
		},
	}
	load.Flags().StringVar(&ref, "ref", "", "also store the image under this reference")
	c.AddCommand(load)
	return c
}

func volumeCmd(g *globals, af *apiFlags) *cobra.Command {
	c := &cobra.Command{Use: "volume", Aliases: []string{"volumes", "vol"}, Short: "Named persistent volumes"}
	var app, size, fromSnapshot, fromVolume string
	var asJSON, listSnapshots, autoBackup bool
	var retention int
	gib := func() (int, error) {
		n, err := parseSize(size)
		if err != nil {
			return 0, err
		}
		if n%(1<<30) != 0 {
			return 0, errdefs.Invalid("--size %s: volumes are sized in whole GiB, like 1G or 10G", size)
		}
		return int(n >> 30), nil
	}
	appClient := func() (*client.Client, error) {
		if app == "" {
			return nil, errdefs.Invalid("--app is required")
		}
		return af.client(g)
	}
	// snapshotSettings is what the snapshot flags given on cmd ask for; nil where unset.
	snapshotSettings := func(cmd *cobra.Command) (days *int, auto *bool) {
		if cmd.Flags().Changed("snapshot-retention") {
			days = &retention
		}
		if cmd.Flags().Changed("auto-backup") {
			auto = &autoBackup
		}
		return days, auto
	}
	create := &cobra.Command{
		Use: "create NAME --app APP --size 1G", Short: "Create a volume", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := appClient()
			if err != nil {
				return err
			}
			n, err := gib()
			if err != nil {
				return err
			}
			if err := cl.CreateApp(cmd.Context(), app); err != nil && !errors.Is(err, errdefs.ErrConflict) {
				return err
			}
			req := api.CreateVolumeRequest{Name: args[0]}
			if cmd.Flags().Changed("size") || fromSnapshot == "" && fromVolume == "" {
				req.SizeGB = &n
			}
			if fromSnapshot != "" {
				req.SnapshotID = &fromSnapshot
			}
			if fromVolume != "" {
				req.SourceVolumeID = &fromVolume
			}
			req.SnapshotRetention, req.AutoBackupEnabled = snapshotSettings(cmd)
			v, err := cl.CreateVolume(cmd.Context(), app, req)
			if err != nil {
				return err
			}
			fmt.Println(v.ID)
			return nil
		},
	}
	create.Flags().StringVar(&size, "size", "1G", "size in whole GiB, e.g. 1G (default with --snapshot or --fork: its size)")
	create.Flags().StringVar(&fromSnapshot, "snapshot", "", "restore this snapshot ID into the new volume")
	create.Flags().StringVar(&fromVolume, "fork", "", "start the new volume as a copy of this volume (ID or name), in use or not")
	snapshotFlags := func(c *cobra.Command) {
		c.Flags().IntVar(&retention, "snapshot-retention", 5, "days to keep the volume's snapshots")
		c.Flags().BoolVar(&autoBackup, "auto-backup", false, "take a snapshot of the volume every day")
	}
	snapshotFlags(create)
	update := &cobra.Command{
		Use: "update NAME --app APP [--snapshot-retention DAYS] [--auto-backup=BOOL]", Short: "Change how a volume's snapshots are kept",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := appClient()
			if err != nil {
				return err
			}
			var req api.UpdateVolumeRequest
			req.SnapshotRetention, req.AutoBackupEnabled = snapshotSettings(cmd)
			v, err := cl.UpdateVolume(cmd.Context(), app, args[0], req)
			if err != nil {
				return err
			}
			fmt.Printf("volume %s keeps snapshots %d days; daily snapshots %v\n", v.Name, v.SnapshotRetention, v.AutoBackupEnabled)
			return nil
		},
	}
	snapshotFlags(update)
	snapshot := &cobra.Command{
		Use: "snapshot NAME --app APP", Short: "Snapshot a volume (ls with --list)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := appClient()
			if err != nil {
				return err
			}
			if listSnapshots {
				sns, err := cl.Snapshots(cmd.Context(), app, args[0])
				if err != nil {
					return err
				}
				if asJSON {
					return printJSON(sns)
				}
				for _, sn := range sns {
					fmt.Printf("%s\t%s\t%dG\t%dM stored\n", sn.ID, sn.CreatedAt.Local().Format(time.DateTime), sn.VolumeSize>>30, sn.Size>>20)
				}
				return nil
			}
			sn, err := cl.SnapshotVolume(cmd.Context(), app, args[0])
			if err != nil {
				return err
			}
			fmt.Println(sn.ID)
			return nil
		},
	}
	snapshot.Flags().BoolVar(&listSnapshots, "list", false, "list the volume's snapshots instead")
	ls := &cobra.Command{
		Use: "ls --app APP", Short: "List volumes", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := appClient()
			if err != nil {
				return err
			}
			vs, err := cl.ListVolumes(cmd.Context(), app)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(vs)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tSIZE\tUSED\tATTACHED TO")
			for _, v := range vs {
				fmt.Fprintf(tw, "%s\t%s\t%dG\t%dM\t%s\n", v.ID, v.Name, v.SizeGB, v.UsedBytes>>20, deref(v.AttachedMachineID))
			}
			return tw.Flush()
		},
	}
	ls.Flags().BoolVar(&asJSON, "json", false, "print JSON with the API's field names")
	extend := &cobra.Command{
		Use: "extend NAME --app APP --size 2G", Short: "Grow a volume", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := appClient()
			if err != nil {
				return err
			}
			n, err := gib()
			if err != nil {
				return err
			}
			res, err := cl.ExtendVolume(cmd.Context(), app, args[0], n)
			if err != nil {
				return err
			}
			fmt.Printf("volume %s is now %dG\n", res.Volume.Name, res.Volume.SizeGB)
			if res.NeedsRestart {
				fmt.Printf("restart machine %s to use the new size\n", deref(res.Volume.AttachedMachineID))
			}
			return nil
		},
	}
	extend.Flags().StringVar(&size, "size", "", "new size in whole GiB")
	destroy := &cobra.Command{
		Use: "destroy NAME --app APP", Short: "Destroy a volume no machine holds", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := appClient()
			if err != nil {
				return err
			}
			return cl.DeleteVolume(cmd.Context(), app, args[0])
		},
	}
	c.PersistentFlags().StringVar(&app, "app", os.Getenv("KILN_APP"), "app (env KILN_APP)")
	c.AddCommand(create, update, ls, extend, destroy, snapshot)
	return c
}

// deref is what s points to, or "" for nil.
func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// parsePort reads PUBLIC:INTERNAL[/http|/tcp] into a service.
// waitStarted waits until a new machine has started, as `fly machine run` does, saying
// on stderr what it waits for. A workload that has already run to its end counts as
// started (its exit is reported); a machine that failed is an error naming its logs.
func waitStarted(ctx context.Context, cl *client.Client, app, id string, limit time.Duration) error {
	fmt.Fprintf(os.Stderr, "waiting for machine %s to start (--detach returns at once)...\n", id)
	t0 := time.Now()
	for {
		step := min(30*time.Second, max(time.Second, limit-time.Since(t0)))
		got, err := cl.WaitFor(ctx, app, id, []string{"started", "stopped", "failed", "destroyed"}, step)
		switch {
		case errors.Is(err, errdefs.ErrTimeout) && time.Since(t0) < limit:
			m, gerr := cl.GetMachine(ctx, app, id)
			if gerr != nil {
				return gerr
			}
			fmt.Fprintf(os.Stderr, "machine %s is still %s after %s\n", id, m.State, time.Since(t0).Round(time.Second))
			continue
		case errors.Is(err, errdefs.ErrTimeout):
			return errdefs.Wrap(errdefs.ErrTimeout, err, "machine %s did not start within %s (it goes on; see `kiln machine ls --app %s` and `kiln logs %s`)", id, limit, app, id)
		case err != nil:
			return err
		}
		switch got.State {
		case "started":
			fmt.Fprintf(os.Stderr, "machine %s started in %s\n", id, time.Since(t0).Round(100*time.Millisecond))
			return nil
		case "stopped", "destroyed":
			m, err := cl.GetMachine(ctx, app, id)
			if err == nil && m.ExitCode != nil {
				fmt.Fprintf(os.Stderr, "machine %s ran and exited with status %d (its output: kiln logs %s)\n", id, *m.ExitCode, id)
			} else {
				fmt.Fprintf(os.Stderr, "machine %s is %s\n", id, got.State)
			}
			return nil
		default:
			return errdefs.New(errdefs.ErrUnavailable, "machine %s failed to start: see its events with `kiln machine ls --app %s` and its output with `kiln logs %s`", id, app, id)
		}
	}
}

func parsePort(s string) (api.Service, error) {
	bad := errdefs.Invalid("--port %q: want PUBLIC:INTERNAL with an optional /http or /tcp, like 80:8080/http", s)
	spec, proto, _ := strings.Cut(s, "/")
	pub, internal, ok := strings.Cut(spec, ":")
	if !ok {
		return api.Service{}, bad
	}
	pp, err1 := strconv.Atoi(pub)
	ip, err2 := strconv.Atoi(internal)
	if err1 != nil || err2 != nil {
		return api.Service{}, bad
	}
	port := api.ServicePort{Port: pp}
	switch proto {
	case "http":
		port.Handlers = []string{"http"}
	case "", "tcp":
	default:
		return api.Service{}, bad
	}
	return api.Service{Protocol: "tcp", InternalPort: ip, Ports: []api.ServicePort{port}}, nil
}

// execMachine runs argv in a machine over a streaming exec and returns its exit status
// as kiln's.
func execMachine(ctx context.Context, af *apiFlags, g *globals, ref string, argv []string, tty, interactive bool, timeout time.Duration) error {
	stdinFd, stdoutFd := int(os.Stdin.Fd()), int(os.Stdout.Fd())
	if tty && !term.IsTerminal(stdinFd) {
		return errdefs.Invalid("--tty needs a terminal on stdin")
	}
	cl, err := af.client(g)
	if err != nil {
		return err
	}
	app, m, err := cl.FindMachine(ctx, ref)
	if err != nil {
		return err
	}
	req := api.ExecRequest{Command: argv, TTY: tty, Timeout: int((timeout + time.Second - 1) / time.Second)}
	if tty {
		if w, h, err := term.GetSize(stdoutFd); err == nil {
			req.Rows, req.Cols = uint16(h), uint16(w)
		}
	}
	sess, err := cl.ExecStream(ctx, app, m.ID, req)
	if err != nil {
		return err
	}
	var stdin io.Reader
	if tty || interactive || !term.IsTerminal(stdinFd) {
		stdin = os.Stdin
	}
	if tty {
		if old, err := term.MakeRaw(stdinFd); err == nil {
			defer term.Restore(stdinFd, old)
		}
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				if w, h, err := term.GetSize(stdoutFd); err == nil {
					sess.Resize(uint16(h), uint16(w))
				}
			}
		}()
	}
	st, err := sess.Run(ctx, stdin, os.Stdout, os.Stderr)
	if err != nil {
		return err
	}
	if st.TimedOut {
		fmt.Fprintf(os.Stderr, "kiln: %s timed out after %s and was killed\n", argv[0], timeout)
		return exitError{124}
	}
	if st.ExitCode != 0 {
		return exitError{st.ExitCode}
	}
	return nil
}
