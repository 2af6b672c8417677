package main

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/buildcontext"
	"github.com/kilnhq/kiln/internal/errdefs"
)

func buildCmd(g *globals, af *apiFlags) *cobra.Command {
	var (
		project, file, target, branch, gitRef string
		gitURL                                string
		tags, buildArgs, labels, secrets      []string
		noSupersede, detach                   bool
	)
	c := &cobra.Command{
		Use:   "build [DIR | --git URL] --project P [--tag REF]...",
		Short: "Build a Dockerfile in the project's builder VM and push the image to kiln's registry",
		Long: `Build DIR (the context; .dockerignore is honoured) with BuildKit in the project's own
builder microVM, whose cache volume stays on the server: the second build reuses every
unchanged layer and RUN --mount=type=cache directory. The image is pushed to kiln's
registry under each --tag (default localhost/PROJECT:BUILD_ID). Progress is BuildKit's
plain output, streamed live. Exit status: 0 built, 1 failed or canceled.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if (len(args) == 1) == (gitURL != "") {
				return errdefs.Invalid("give the context as a directory or as --git URL (one of them)")
			}
			if project == "" {
				return errdefs.Invalid("--project is required: builds of one project share its builder and cache")
			}
			spec := api.BuildSpec{Dockerfile: file, Target: target, Tags: tags, Branch: branch, GitRef: gitRef, GitURL: gitURL, NoSupersede: noSupersede}
			var err error
			if spec.BuildArgs, err = keyValues("--build-arg", buildArgs); err != nil {
				return err
			}
			if spec.Labels, err = keyValues("--label", labels); err != nil {
				return err
			}
			sec, err := readSecrets(secrets)
			if err != nil {
				return err
			}
			// An empty context for --git: the server clones.
			writeContext := func(w io.Writer) error { return tar.NewWriter(w).Close() }
			if gitURL == "" {
				// The directory is checked here, before the server is asked anything, so
				// that a local mistake is reported as one.
				dir, err := buildcontext.Open(args[0], spec.Dockerfile)
				if err != nil {
					return err
				}
				writeContext = dir.WriteTar
			}
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			b, err := submitBuild(ctx, cl, project, spec, writeContext, sec)
			if err != nil {
				return err
			}
			if detach {
				fmt.Println(b.ID)
				return nil
			}
			return followBuild(ctx, af, g, project, b.ID)
		},
	}
	f := c.Flags()
	f.StringVar(&project, "project", os.Getenv("KILN_PROJECT"), "project (env KILN_PROJECT): its builds share a builder and cache")
	f.StringVarP(&file, "file", "f", "", "Dockerfile path inside the context (default Dockerfile)")
	f.StringVar(&target, "target", "", "stage to build")
	f.StringArrayVarP(&tags, "tag", "t", nil, "image reference to push, like localhost/shop/web:v2 (repeatable)")
	f.StringArrayVar(&buildArgs, "build-arg", nil, "build argument K=V (repeatable)")
	f.StringArrayVar(&labels, "label", nil, "image label K=V (repeatable)")
	f.StringArrayVar(&secrets, "secret", nil, "secret for RUN --mount=type=secret: id=ID,src=FILE or id=ID,env=VAR (repeatable); never stored")
	f.StringVar(&branch, "branch", "", "branch: a newer build of the same branch cancels this one")
	f.StringVar(&gitRef, "git-ref", "", "with --git: the branch, tag or commit to build; always recorded in the image's labels")
	f.StringVar(&gitURL, "git", "", "build from a git repository (https://, ssh:// or git://; file:// where the server runs with --build-git-allow-file) that the server fetches, instead of DIR")
	f.BoolVar(&noSupersede, "no-supersede", false, "do not let a newer build of the branch cancel this one")
	f.BoolVarP(&detach, "detach", "d", false, "queue the build and print its ID without waiting")

	var lsProject string
	ls := &cobra.Command{Use: "ls --project P", Short: "List a project's builds", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			bs, err := cl.ListBuilds(cmd.Context(), lsProject)
			if err != nil {
				return err
			}
			fmt.Printf("%-14s  %-9s  %-7s  %-8s  %s\n", "ID", "STATE", "CACHED", "SECONDS", "IMAGE")
			for _, b := range bs {
				img := strings.Join(b.Pushed, ", ")
				if b.Error != "" {
					img = b.Error
				}
				fmt.Printf("%-14s  %-9s  %3d/%-3d  %8.1f  %s\n", b.ID, b.State, b.CachedSteps, b.TotalSteps, float64(b.DurationMS)/1000, img)
			}
			return nil
		}}
	ls.Flags().StringVar(&lsProject, "project", os.Getenv("KILN_PROJECT"), "project (env KILN_PROJECT)")
	var follow bool
	var opProject string
	logs := &cobra.Command{Use: "logs BUILD_ID [-f]", Short: "Print a build's log", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			project, cl, err := projectClient(af, g, opProject)
			if err != nil {
				return err
			}
			if follow {
				return followBuild(cmd.Context(), af, g, project, args[0])
			}
			_, err = cl.BuildLogs(cmd.Context(), project, args[0], false, func(l string) { fmt.Println(l) })
			return err
		}}
	logs.Flags().BoolVarP(&follow, "follow", "f", false, "wait for the build and print lines as they come")
	cancel := &cobra.Command{Use: "cancel BUILD_ID", Short: "Cancel a queued or running build", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			project, cl, err := projectClient(af, g, opProject)
			if err != nil {
				return err
			}
			return cl.CancelBuild(cmd.Context(), project, args[0])
		}}
	for _, sub := range []*cobra.Command{logs, cancel} {
		sub.Flags().StringVar(&opProject, "project", os.Getenv("KILN_PROJECT"), "the build's project (env KILN_PROJECT)")
	}
	cache := &cobra.Command{Use: "cache", Short: "A project's build cache"}
	show := &cobra.Command{Use: "show --project P", Short: "Show the cache volume's size and use, GC target and resets", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			project, cl, err := projectClient(af, g, opProject)
			if err != nil {
				return err
			}
			ci, err := cl.BuildCache(cmd.Context(), project)
			if err != nil {
				return err
			}
			fmt.Printf("project      %s\nvolume       %s\nused         %d MiB of %d MiB\ngc keeps     %d MiB\nreset above  %.0f%% full after GC (%d resets since the server started)\nbuilder      %s\n",
				ci.Project, ci.Path, ci.UsedBytes>>20, ci.SizeBytes>>20, ci.KeepBytes>>20, ci.ResetAbove*100, ci.Resets, ci.Builder)
			return nil
		}}
	prune := &cobra.Command{Use: "prune --project P", Short: "Empty the project's build cache", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			project, cl, err := projectClient(af, g, opProject)
			if err != nil {
				return err
			}
			res, err := cl.PruneBuildCache(cmd.Context(), project)
			if err != nil {
				return err
			}
			fmt.Printf("freed %d MiB\n", res.FreedBytes>>20)
			return nil
		}}
	cache.AddCommand(show, prune)
	builder := &cobra.Command{Use: "builder", Short: "The project's builder VM"}
	rm := &cobra.Command{Use: "rm --project P", Short: "Remove the project's builder VM (it outlives `kiln server` restarts); its cache stays", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			project, cl, err := projectClient(af, g, opProject)
			if err != nil {
				return err
			}
			if err := cl.RemoveBuilder(cmd.Context(), project); err != nil {
				return err
			}
			fmt.Printf("removed the builder VM of %s; its cache stays\n", project)
			return nil
		}}
	builder.AddCommand(rm)
	for _, sub := range []*cobra.Command{show, prune, rm} {
		sub.Flags().StringVar(&opProject, "project", os.Getenv("KILN_PROJECT"), "project (env KILN_PROJECT)")
	}
	c.AddCommand(ls, logs, cancel, cache, builder)
	return c
}

// projectClient checks --project and returns it with an API client.
func projectClient(af *apiFlags, g *globals, project string) (string, *client.Client, error) {
	if project == "" {
		return "", nil, errdefs.Invalid("--project is required (or set KILN_PROJECT)")
	}
	cl, err := af.client(g)
	return project, cl, err
}

// followBuild prints a build's log until it ends and turns its end into an exit status.
func followBuild(ctx context.Context, af *apiFlags, g *globals, project, id string) error {
	cl, err := af.client(g)
	if err != nil {
		return err
	}
	b, err := cl.BuildLogs(ctx, project, id, true, func(l string) { fmt.Println(l) })
	if err != nil {
		return err
	}
	switch b.State {
	case "succeeded":
		fmt.Fprintf(os.Stderr, "built %s in %.1fs: %d of %d steps cached; pushed %s\n", b.ID, float64(b.DurationMS)/1000, b.CachedSteps, b.TotalSteps, strings.Join(b.Pushed, ", "))
		for _, t := range b.Pushed {
			fmt.Println(t)
		}
		return nil
	case "failed":
		why := "the build failed"
		if b.Failure == "infrastructure" {
			why = "kiln's infrastructure failed (retries exhausted)"
		}
		fmt.Fprintf(os.Stderr, "build %s failed: %s: %s\n", b.ID, why, b.Error)
	default:
		fmt.Fprintf(os.Stderr, "build %s %s: %s\n", b.ID, b.State, b.Error)
	}
	return exitError{1}
}

func keyValues(flag string, kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	out := map[string]string{}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, errdefs.Invalid("%s %q: want KEY=VALUE", flag, kv)
		}
		out[k] = v
	}
	return out, nil
}

// readSecrets reads --secret id=ID,src=FILE|env=VAR values on this machine.
func readSecrets(specs []string) (map[string][]byte, error) {
	out := map[string][]byte{}
	for _, s := range specs {
		var id, src, env string
		for _, f := range strings.Split(s, ",") {
			k, v, _ := strings.Cut(f, "=")
			switch k {
			case "id":
				id = v
			case "src", "source":
				src = v
			case "env":
				env = v
			default:
				return nil, errdefs.Invalid("--secret %q: want id=ID,src=FILE or id=ID,env=VAR", s)
			}
		}
		if id == "" || (src == "") == (env == "") {
			return nil, errdefs.Invalid("--secret %q: want id=ID and one of src=FILE or env=VAR", s)
		}
		if src != "" {
			b, err := os.ReadFile(src)
			if err != nil {
				return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "--secret %s: src=%s must be a file you can read", id, src)
			}
			out[id] = b
		} else {
			v, ok := os.LookupEnv(env)
			if !ok {
				return nil, errdefs.Invalid("--secret %s: environment variable %s is not set", id, env)
			}
			out[id] = []byte(v)
		}
	}
	return out, nil
}
