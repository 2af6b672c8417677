package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"unicode"

	"github.com/spf13/cobra"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
)

func eventsCmd(g *globals, af *apiFlags) *cobra.Command {
	var q client.EventQuery
	var follow, asJSON bool
	c := &cobra.Command{Use: "events", Short: "Events across apps, machines and builds, oldest first; -f follows them as they happen", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := af.client(g)
			if err != nil {
				return err
			}
			print := func(e api.StreamEvent) error {
				if asJSON {
					b, _ := json.Marshal(e)
					fmt.Println(string(b))
					return nil
				}
				fmt.Println(eventLine(e))
				return nil
			}
			if follow {
				return cl.FollowEvents(cmd.Context(), q, print, func(err error) {
					fmt.Fprintf(os.Stderr, "kiln: the event stream dropped (%v); reconnecting\n", err)
				})
			}
			list, err := cl.ListEvents(cmd.Context(), q)
			if err != nil {
				return err
			}
			for _, e := range list.Events {
				print(e)
			}
			return nil
		}}
	f := c.Flags()
	f.BoolVarP(&follow, "follow", "f", false, "keep going: print each event as it happens (reconnecting, without a gap, if the connection drops)")
	f.StringVar(&q.App, "app", "", "only this app's machine events")
	f.StringVar(&q.Machine, "machine", "", "only this machine's events")
	f.StringVar(&q.Project, "project", "", "only this build project's events")
	f.StringVar(&q.Build, "build", "", "only this build's events")
	f.StringSliceVar(&q.Types, "type", nil, "only these types (machine.start, build.failed...; repeatable or comma-separated)")
	f.Int64Var(&q.After, "after", 0, "only events after this id (resume where an earlier run stopped)")
	f.IntVar(&q.Limit, "limit", 0, "how many events: the newest, or with --after the first after it (the server's default: 100)")
	f.BoolVar(&asJSON, "json", false, "one JSON object per event and line")
	return c
}

// eventLine is an event as `kiln events` prints it: time, type, what it is about, state
// and message. The message may carry a guest's text, so control characters are shown
// as such rather than sent to the terminal.
func eventLine(e api.StreamEvent) string {
	about := e.App + "/" + e.MachineID
	if e.BuildID != "" || e.Project != "" {
		about = e.Project + "/" + e.BuildID
	}
	line := fmt.Sprintf("%-24s  %-18s  %-36s  %-10s  %s", e.Time.UTC().Format("2006-01-02T15:04:05.000Z"), e.Type, about, e.State, e.Message)
	return strings.TrimRight(strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return '\uFFFD'
		}
		return r
	}, line), " ")
}
