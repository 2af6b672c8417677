package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/appconfig"
	"github.com/kilnhq/kiln/internal/buildcontext"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// appFile is the app's config: --config, else ./kiln.toml, else ./fly.toml.
func appFile(path string) (string, *appconfig.Config, error) {
	if path == "" {
		for _, p := range []string{"kiln.toml", "fly.toml"} {
			if _, err := os.Stat(p); err == nil {
				path = p
				break
			}
		}
	}
	if path == "" {
		return "", nil, errdefs.Invalid("no kiln.toml or fly.toml here: run in the app's directory or name the file with --config")
	}
	cfg, err := appconfig.Load(path)
	return path, cfg, err
}

// appName is --app, else the app the config in this directory names.
func appName(app string) (string, error) {
	if app != "" {
		return app, nil
	}
	if _, cfg, err := appFile(""); err == nil {
		return cfg.App, nil
	}
	return "", errdefs.Invalid("--app is required here (no kiln.toml or fly.toml names one)")
}

// appClient resolves the app (appName) and returns it with an API client.
func appClient(af *apiFlags, g *globals, app string) (string, *client.Client, error) {
	app, err := appName(app)
	if err != nil {
		return "", nil, err
	}
	cl, err := af.client(g)
	return app, cl, err
}

// started reports a release the server has begun, then follows it unless detach.
func started(ctx context.Context, cl *client.Client, res api.DeployResponse, detach bool, what string) error {
	fmt.Fprintf(os.Stderr, "release %d of %s: %s %s\n", res.Release.Version, res.Release.App, what, res.Release.Image)
	if detach {
		fmt.Println(res.Release.Version)
		return nil
	}
	return followRelease(ctx, cl, res.Release)
}

// deployFlags are what deploy and plan share.
type deployFlags struct {
	config, app, image, strategy string
}

func (d *deployFlags) register(c *cobra.Command) {
	f := c.Flags()
	f.StringVarP(&d.config, "config", "c", "", "the app's config (default ./kiln.toml, else ./fly.toml)")
	f.StringVarP(&d.app, "app", "a", "", "the app (default the config's app)")
	f.StringVar(&d.image, "image", "", "deploy this image instead of building [build]")
	f.StringVar(&d.strategy, "strategy", "", "rolling, immediate, canary or bluegreen (default the config's [deploy] strategy)")
}

// request reads the config and makes the request; build says whether [build] is built
// (deploy) or the current release's image stands in for it (plan).
func (d *deployFlags) request(ctx context.Context, af *apiFlags, g *globals, build bool) (string, api.DeployRequest, *client.Client, error) {
	path, cfg, err := appFile(d.config)
	if err != nil {
		return "", api.DeployRequest{}, nil, err
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return "", api.DeployRequest{}, nil, err
	}
	app := d.app
	if app == "" {
		app = cfg.App
	}
	cl, err := af.client(g)
	if err != nil {
		return "", api.DeployRequest{}, nil, err
	}
	req := api.DeployRequest{Config: string(raw), ConfigName: filepath.Base(path), Image: d.image, Strategy: d.strategy}
	if req.LocalFiles, err = localFiles(cfg, filepath.Dir(path)); err != nil {
		return "", req, nil, err
	}
	switch {
	case req.Image != "":
	case cfg.Build != nil && cfg.Build.Image != "" && cfg.Build.Dockerfile == "":
		req.Image = cfg.Build.Image
	case build:
		if req.Image, err = buildForDeploy(ctx, cl, cfg, filepath.Dir(path)); err != nil {
			return "", req, nil, err
		}
	default:
		rels, err := cl.Releases(ctx, app)
		if err == nil && len(rels) > 0 {
			req.Image = rels[0].Image
			fmt.Fprintf(os.Stderr, "plan: with the current image %s (kiln deploy builds a new one first)\n", req.Image)
		} else {
			return "", req, nil, errdefs.Invalid("plan needs an image: the app has no release yet; give --image")
		}
	}
	return app, req, cl, nil
}

// maxLocalFile bounds a [[files]] local_path: machine configs are small.
const maxLocalFile = 32 << 10

// localFiles reads the config's [[files]] local_path entries, beside the config.
func localFiles(cfg *appconfig.Config, dir string) (map[string]string, error) {
	out := map[string]string{}
	for _, f := range cfg.Files {
		if f.LocalPath == "" {
			continue
		}
		p := f.LocalPath
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("[[files]] local_path %s: %w", f.LocalPath, err)
		}
		if len(b) > maxLocalFile {
			return nil, errdefs.Invalid("[[files]] local_path %s has %d bytes, over the limit of %d: put larger files in the image", f.LocalPath, len(b), maxLocalFile)
		}
		out[f.LocalPath] = base64.StdEncoding.EncodeToString(b)
	}
	return out, nil
}

// buildForDeploy builds [build] (or the Dockerfile beside the config) in the project's
// builder and returns the image by digest.
func buildForDeploy(ctx context.Context, cl *client.Client, cfg *appconfig.Config, dir string) (string, error) {
	spec := api.BuildSpec{}
	if cfg.Build != nil {
		spec.Dockerfile, spec.Target, spec.BuildArgs = cfg.Build.Dockerfile, cfg.Build.Target, cfg.Build.Args
	}
	project := cfg.Kiln.Project
	if project == "" {
		project = cfg.App
	}
	ctxDir, err := buildcontext.Open(dir, spec.Dockerfile)
	if err != nil {
		return "", err
	}
	b, err := submitBuild(ctx, cl, project, spec, ctxDir.WriteTar, nil)
	if err != nil {
		return "", err
	}
	b, err = cl.BuildLogs(ctx, project, b.ID, true, func(l string) { fmt.Fprintln(os.Stderr, l) })
	if err != nil {
		return "", err
	}
	if b.State != "succeeded" || b.Image == "" || len(b.Pushed) == 0 {
		return "", fmt.Errorf("build %s %s: %s; nothing was deployed", b.ID, b.State, b.Error)
	}
	ref := b.Pushed[0]
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		ref = ref[:i]
	}
	fmt.Fprintf(os.Stderr, "built %s in %.1fs: %d of %d steps cached\n", b.ID, float64(b.DurationMS)/1000, b.CachedSteps, b.TotalSteps)
	return ref + "@" + b.Image, nil
}

// submitBuild sends a build with its context, written by writeContext.
func submitBuild(ctx context.Context, cl *client.Client, project string, spec api.BuildSpec, writeContext func(io.Writer) error, sec map[string][]byte) (api.Build, error) {
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(writeContext(pw)) }()
	b, err := cl.SubmitBuild(ctx, project, spec, pr, sec)
	pr.Close()
	if err == nil {
		fmt.Fprintf(os.Stderr, "build %s of %s queued\n", b.ID, project)
	}
	return b, err
}

// printPlan writes a plan: one line per machine, and each changed field.
func printPlan(w io.Writer, p api.Plan) {
	counts := map[string]int{}
	for _, s := range p.Steps {
		counts[s.Change]++
		m := s.Machine
		if m == "" {
			m = "(new)"
		}
		fmt.Fprintf(w, "%-8s %-14s group %s\n", s.Change, m, s.Group)
		for _, d := range s.Diff {
			fmt.Fprintf(w, "    %s: %s -> %s\n", d.Path, orNone(d.Old), orNone(d.New))
		}
	}
	var sum []string
	for _, c := range []string{"create", "update", "replace", "destroy", "none"} {
		if counts[c] > 0 {
			sum = append(sum, fmt.Sprintf("%d %s", counts[c], c))
		}
	}
	if len(sum) == 0 {
		sum = []string{"no machines"}
	}
	fmt.Fprintf(w, "plan (%s): %s\n", p.Strategy, strings.Join(sum, ", "))
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

// followRelease prints a release's progress until it ends; a release that did not
// succeed exits 1.
func followRelease(ctx context.Context, cl *client.Client, rel api.Release) error {
	last := ""
	for {
		if rel.Message != last && rel.Message != "" {
			fmt.Fprintf(os.Stderr, "release %d: %s\n", rel.Version, rel.Message)
			last = rel.Message
		}
		switch rel.State {
		case "succeeded":
			fmt.Printf("release %d succeeded\n", rel.Version)
			return nil
		case "failed", "rolled_back":
			fmt.Printf("release %d %s\n", rel.Version, strings.ReplaceAll(rel.State, "_", " "))
			return exitError{1}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
		var err error
		if rel, err = cl.Release(ctx, rel.App, rel.Version); err != nil {
			return err
		}
	}
}

func deployCmd(g *globals, af *apiFlags) *cobra.Command {
	var df deployFlags
	var yes, detach bool
	c := &cobra.Command{
		Use:   "deploy [--config FILE] [--yes]",
		Short: "Build the app's [build], show the plan and deploy it as a new release",
		Long: `Deploy reads ./kiln.toml or an unchanged ./fly.toml, builds its [build] in the project's
builder, shows what the release changes machine by machine, and asks the server to
apply it with the [deploy] strategy. The deploy runs on the server: it goes on if this
command stops, and a server restart resumes it. A machine still failing its checks after
wait_timeout rolls the app back to the previous release. Exit status: 0 when the release
succeeded, 1 when it failed or was rolled back.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			app, req, cl, err := df.request(ctx, af, g, true)
			if err != nil {
				return err
			}
			// A first deploy makes its app, as fly launch does.
			if err := cl.CreateApp(ctx, app); err == nil {
				fmt.Fprintf(os.Stderr, "created app %s\n", app)
			} else if !errors.Is(err, errdefs.ErrConflict) && !errors.Is(err, errdefs.ErrForbidden) {
				return err // (a token that may not create it hears why from the plan)
			}
			p, err := cl.Plan(ctx, app, req)
			if err != nil {
				return err
			}
			printPlan(os.Stderr, p)
			if !yes {
				if !term.IsTerminal(int(os.Stdin.Fd())) {
					return errdefs.Invalid("not asking on a terminal: pass --yes to deploy without confirming")
				}
				fmt.Fprint(os.Stderr, "deploy? [y/N] ")
				answer, _ := bufio.NewReader(os.Stdin).ReadString('\n')
				if a := strings.TrimSpace(strings.ToLower(answer)); a != "y" && a != "yes" {
					return errdefs.Invalid("not deployed")
				}
			}
			req.ExpectPlan = p.Digest // what was shown is what is applied, or nothing
			res, err := cl.Deploy(ctx, app, req)
			if err != nil {
				return err
			}
			return started(ctx, cl, res, detach, "deploying")
		},
	}
	df.register(c)
	c.Flags().BoolVarP(&yes, "yes", "y", false, "deploy without asking (for scripts)")
	c.Flags().BoolVarP(&detach, "detach", "d", false, "print the release's version and return; the deploy goes on on the server")
	return c
}

func planCmd(g *globals, af *apiFlags) *cobra.Command {
	var df deployFlags
	c := &cobra.Command{
		Use:   "plan [--config FILE]",
		Short: "Show what kiln deploy would change, machine by machine, changing nothing",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			app, req, cl, err := df.request(cmd.Context(), af, g, false)
			if err != nil {
				return err
			}
			p, err := cl.Plan(cmd.Context(), app, req)
			if err != nil {
				return err
			}
			printPlan(os.Stdout, p)
			return nil
		},
	}
	df.register(c)
	return c
}

func releasesCmd(g *globals, af *apiFlags) *cobra.Command {
	var app string
	c := &cobra.Command{
		Use:   "releases [--app A]",
		Short: "List the app's releases, newest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			app, cl, err := appClient(af, g, app)
			if err != nil {
				return err
			}
			rels, err := cl.Releases(cmd.Context(), app)
			if err != nil {
				return err
			}
			fmt.Printf("%-7s  %-11s  %-9s  %-7s  %-20s  %s\n", "VERSION", "STATE", "STRATEGY", "SECRETS", "CREATED", "IMAGE")
			for _, r := range rels {
				fmt.Printf("v%-6d  %-11s  %-9s  %-7d  %-20s  %s\n", r.Version, r.State, r.Strategy, r.SecretsVersion, r.CreatedAt.UTC().Format(time.DateTime), r.Image)
				if r.Message != "" && r.State != "succeeded" {
					fmt.Printf("         %s\n", r.Message)
				}
			}
			return nil
		},
	}
	c.Flags().StringVarP(&app, "app", "a", "", "the app (default the config's app)")
	return c
}

func rollbackCmd(g *globals, af *apiFlags) *cobra.Command {
	var app string
	var detach bool
	c := &cobra.Command{
		Use:   "rollback [VERSION] [--app A]",
		Short: "Deploy an earlier release again (default: the one before the latest that succeeded)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			version := 0
			if len(args) == 1 {
				var err error
				if version, err = strconv.Atoi(strings.TrimPrefix(args[0], "v")); err != nil || version < 1 {
					return errdefs.Invalid("release %q: give its number, like 3 or v3 (kiln releases lists them)", args[0])
				}
			}
			app, cl, err := appClient(af, g, app)
			if err != nil {
				return err
			}
			res, err := cl.Rollback(cmd.Context(), app, version)
			if err != nil {
				return err
			}
			printPlan(os.Stderr, res.Plan)
			return started(cmd.Context(), cl, res, detach, fmt.Sprintf("deploying release %d again:", res.Release.RollbackOf))
		},
	}
	c.Flags().StringVarP(&app, "app", "a", "", "the app (default the config's app)")
	c.Flags().BoolVarP(&detach, "detach", "d", false, "print the release's version and return")
	return c
}

func scaleCmd(g *globals, af *apiFlags) *cobra.Command {
	var app, group string
	scale := &cobra.Command{Use: "scale", Short: "Change how many machines a process group runs"}
	count := &cobra.Command{
		Use:   "count N [--process GROUP] [--app A]",
		Short: "Run N machines of a process group: a new release of the latest one",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := strconv.Atoi(args[0])
			if err != nil || n < 0 {
				return errdefs.Invalid("count %q: give a number of machines, like 3", args[0])
			}
			app, cl, err := appClient(af, g, app)
			if err != nil {
				return err
			}
			res, err := cl.Scale(cmd.Context(), app, group, n)
			if err != nil {
				return err
			}
			printPlan(os.Stderr, res.Plan)
			return started(cmd.Context(), cl, res, false, "scaling")
		},
	}
	count.Flags().StringVarP(&app, "app", "a", "", "the app (default the config's app)")
	count.Flags().StringVar(&group, "process", "app", "the process group")
	scale.AddCommand(count)
	return scale
}

func secretsCmd(g *globals, af *apiFlags) *cobra.Command {
	var app string
	c := &cobra.Command{Use: "secrets", Short: "An app's secrets: sealed on the server, given to machines as environment variables at boot"}
	withClient := func(run func(ctx context.Context, cl *client.Client, app string, args []string) (api.Secrets, error)) func(*cobra.Command, []string) error {
		return func(cmd *cobra.Command, args []string) error {
			app, cl, err := appClient(af, g, app)
			if err != nil {
				return err
			}
			s, err := run(cmd.Context(), cl, app, args)
			if err != nil {
				return err
			}
			fmt.Printf("secrets version %d\n", s.Version)
			for _, n := range s.Names {
				fmt.Println(n)
			}
			return nil
		}
	}
	set := &cobra.Command{Use: "set NAME=VALUE... [--app A]", Short: "Set secrets (one new version); machines get them at their next boot (kiln deploy restarts them)",
		Args: cobra.MinimumNArgs(1),
		RunE: withClient(func(ctx context.Context, cl *client.Client, app string, args []string) (api.Secrets, error) {
			vals := map[string]string{}
			for _, kv := range args {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					return api.Secrets{}, errdefs.Invalid("%q: give NAME=VALUE (use - as VALUE to read it from stdin)", strings.SplitN(kv, "=", 2)[0])
				}
				if v == "-" {
					b, err := io.ReadAll(io.LimitReader(os.Stdin, 64<<10+1))
					if err != nil {
						return api.Secrets{}, err
					}
					v = strings.TrimSuffix(string(b), "\n")
				}
				vals[k] = v
			}
			return cl.SetSecrets(ctx, app, vals)
		})}
	ls := &cobra.Command{Use: "ls [--app A]", Short: "List the secrets' names (values never leave the server)", Args: cobra.NoArgs,
		RunE: withClient(func(ctx context.Context, cl *client.Client, app string, _ []string) (api.Secrets, error) {
			return cl.Secrets(ctx, app)
		})}
	unset := &cobra.Command{Use: "unset NAME... [--app A]", Short: "Remove secrets (a new version each)", Args: cobra.MinimumNArgs(1),
		RunE: withClient(func(ctx context.Context, cl *client.Client, app string, args []string) (api.Secrets, error) {
			var s api.Secrets
			names := append([]string(nil), args...)
			sort.Strings(names)
			for _, n := range names {
				var err error
				if s, err = cl.UnsetSecret(ctx, app, n); err != nil {
					return s, err
				}
			}
			return s, nil
		})}
	for _, sub := range []*cobra.Command{set, ls, unset} {
		sub.Flags().StringVarP(&app, "app", "a", "", "the app (default the config's app)")
	}
	c.AddCommand(set, ls, unset)
	return c
}
