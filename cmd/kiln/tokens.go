package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
)

func tokensCmd(g *globals, af *apiFlags) *cobra.Command {
	c := &cobra.Command{Use: "tokens", Aliases: []string{"token"}, Short: "Tokens scoped to apps and projects, with a role and an expiry"}
	var req api.CreateTokenRequest
	create := &cobra.Command{Use: "create", Short: "Issue a token (needs the operator's token); prints it once: kiln keeps only its hash", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			t, err := cl.CreateToken(cmd.Context(), req)
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "token %s: %s\n", t.ID, t.Description)
			fmt.Println(t.Token)
			return nil
		}}
	create.Flags().StringArrayVar(&req.Apps, "app", nil, "an app the token reaches (repeatable)")
	create.Flags().StringArrayVar(&req.Projects, "project", nil, "a build project the token reaches (repeatable)")
	create.Flags().StringVar(&req.Role, "role", "deploy", "read, exec, deploy or admin")
	create.Flags().StringVar(&req.Expiry, "expiry", "720h", "how long it lasts, like 720h; 0 for no expiry")
	c.AddCommand(create)

	c.AddCommand(&cobra.Command{Use: "ls", Short: "Issued tokens: what they reach, who made them, expiry and revocation", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			ts, err := cl.Tokens(cmd.Context())
			if err != nil {
				return err
			}
			fmt.Printf("%-20s  %-8s  %-20s  %-10s  %s\n", "ID", "STATE", "CREATED", "BY", "ALLOWS")
			for _, t := range ts {
				state := "active"
				switch {
				case !t.RevokedAt.IsZero():
					state = "revoked"
				case !t.ExpiresAt.IsZero() && time.Now().After(t.ExpiresAt):
					state = "expired"
				}
				fmt.Printf("%-20s  %-8s  %-20s  %-10s  %s\n", t.ID, state, t.CreatedAt.UTC().Format(time.RFC3339), t.CreatedBy, t.Description)
			}
			return nil
		}})

	c.AddCommand(&cobra.Command{Use: "revoke ID", Short: "Revoke a token: every host refuses it within 2 s", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			t, err := cl.RevokeToken(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "revoked %s at %s\n", t.ID, t.RevokedAt.UTC().Format(time.RFC3339))
			return nil
		}})

	var nApps, nProjects []string
	var nRole, nExpiry string
	att := &cobra.Command{Use: "attenuate TOKEN|-", Short: "Narrow a token offline (no server): the new one can do only what both allow; - reads the token from stdin", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			tok := args[0]
			if tok == "-" {
				// Read from stdin, so that the token stays out of the process list.
				b, err := io.ReadAll(io.LimitReader(os.Stdin, 64<<10))
				if err != nil {
					return err
				}
				tok = strings.TrimSpace(string(b))
			}
			caveats, err := attenuation(nApps, nProjects, nRole, nExpiry)
			if err != nil {
				return err
			}
			t, err := auth.Parse(tok)
			if err != nil {
				return err
			}
			if t.ID == auth.OperatorID {
				return errdefs.Invalid("this is the operator's token, whose narrowed copies could not be revoked: make a token with `kiln tokens create --app ... --role ...` instead")
			}
			fmt.Println(t.Attenuate(caveats...))
			return nil
		}}
	att.Flags().StringArrayVar(&nApps, "app", nil, "keep only these apps (repeatable)")
	att.Flags().StringArrayVar(&nProjects, "project", nil, "keep only these build projects (repeatable)")
	att.Flags().StringVar(&nRole, "role", "", "at most this role: read, exec, deploy or admin")
	att.Flags().StringVar(&nExpiry, "expiry", "", "end sooner, like 1h")
	c.AddCommand(att)
	return c
}

// attenuation turns attenuate's flags into caveats.
func attenuation(apps, projects []string, role, expiry string) ([]string, error) {
	var caveats []string
	if role != "" {
		r, err := auth.ParseRole(role)
		if err != nil {
			return nil, err
		}
		caveats = append(caveats, auth.RoleCaveat(r))
	}
	var scope []auth.Resource
	for _, a := range apps {
		scope = append(scope, auth.App(a))
	}
	for _, p := range projects {
		scope = append(scope, auth.Project(p))
	}
	if len(scope) > 0 {
		caveats = append(caveats, auth.ScopeCaveat(scope...))
	}
	if expiry != "" {
		d, err := time.ParseDuration(expiry)
		if err != nil || d <= 0 {
			return nil, errdefs.Invalid("--expiry %q: give a duration like 1h", expiry)
		}
		caveats = append(caveats, auth.ExpiresCaveat(time.Now().Add(d)))
	}
	if len(caveats) == 0 {
		return nil, errdefs.Invalid("nothing to narrow: give --app, --project, --role or --expiry")
	}
	return caveats, nil
}

func auditCmd(g *globals, af *apiFlags) *cobra.Command {
	c := &cobra.Command{Use: "audit", Short: "The audit log: every change and every refused call"}
	var app, since string
	ls := &cobra.Command{Use: "ls", Short: "Audit entries, oldest first", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			es, err := cl.Audit(cmd.Context(), app, since)
			if err != nil {
				return err
			}
			fmt.Printf("%-20s  %-20s  %-12s  %-6s  %-15s  %-48s  %s\n", "TIME", "TOKEN", "APP", "RESULT", "SOURCE", "ACTION", "TARGET")
			for _, e := range es {
				fmt.Printf("%-20s  %-20s  %-12s  %-6d  %-15s  %-48s  %s\n", e.At.UTC().Format(time.RFC3339), e.TokenID, e.App, e.Result, e.Source, e.Action, e.Target)
			}
			return nil
		}}
	ls.Flags().StringVar(&app, "app", "", "only this app's entries")
	ls.Flags().StringVar(&since, "since", "", "only entries since a duration ago (1h) or a time (RFC 3339)")
	c.AddCommand(ls)
	return c
}
