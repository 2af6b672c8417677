package metrics

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kilnhq/kiln/internal/capacity"
)

// registered lists the name of every metric kiln serves, from the collectors' own
// descriptions (a vector with no series yet describes itself too).
func registered() map[string]bool {
	cs := append([]prometheus.Collector{MachineStates{}, Capacity{Ledger: capacity.NewLedger()}, Instances{}}, instruments...)
	ch := make(chan *prometheus.Desc, 256)
	go func() {
		for _, c := range cs {
			c.Describe(ch)
		}
		close(ch)
	}()
	fq := regexp.MustCompile(`fqName: "([^"]+)"`)
	out := map[string]bool{}
	for d := range ch {
		if m := fq.FindStringSubmatch(d.String()); m != nil {
			out[m[1]] = true
		}
	}
	return out
}

var (
	quoted   = regexp.MustCompile(`"[^"]*"`)
	grouped  = regexp.MustCompile(`\{[^}]*\}|\[[^\]]*\]|\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	ident    = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*\s*\(?`)
	keywords = map[string]bool{"and": true, "or": true, "unless": true, "bool": true, "offset": true}
)

// metricNames finds the metric names in a PromQL expression: the identifiers left once
// strings, label matchers, ranges and grouping clauses are gone, that are not calls.
func metricNames(expr string) []string {
	e := grouped.ReplaceAllString(quoted.ReplaceAllString(expr, `""`), " ")
	var out []string
	for _, m := range ident.FindAllString(e, -1) {
		if strings.HasSuffix(m, "(") || keywords[m] {
			continue
		}
		out = append(out, strings.TrimSpace(m))
	}
	return out
}

// The Grafana dashboard in the repository is valid JSON, and every query in it names
// metrics kiln serves: a renamed metric fails here, not on an operator's screen.
func TestDashboardQueriesNameServedMetrics(t *testing.T) {
	b, err := os.ReadFile("../../deploy/grafana/kiln.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Type    string `json:"type"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Query any `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("the dashboard is not valid JSON: %v", err)
	}
	known := registered()
	served := func(name string) bool {
		for _, suffix := range []string{"", "_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && known[base] {
				return true
			}
		}
		return false
	}
	exprs := 0
	check := func(where, expr string) {
		names := metricNames(expr)
		if len(names) == 0 {
			t.Errorf("%s: no metric in %q", where, expr)
		}
		for _, n := range names {
			if !served(n) {
				t.Errorf("%s: %q names %s, which kiln does not serve", where, expr, n)
			}
		}
	}
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			exprs++
			check("panel "+p.Title, tg.Expr)
		}
		if p.Type != "row" && len(p.Targets) == 0 {
			t.Errorf("panel %s has no query", p.Title)
		}
	}
	lv := regexp.MustCompile(`^label_values\((\w+),\s*\w+\)$`)
	for _, v := range d.Templating.List {
		if q, ok := v.Query.(string); ok {
			if m := lv.FindStringSubmatch(q); m != nil {
				check("variable", m[1])
			}
		}
	}
	if d.Title == "" || exprs < 20 {
		t.Errorf("dashboard %q has %d queries", d.Title, exprs)
	}
}

// The check above would notice a name that is not served.
func TestMetricNamesInExpressions(t *testing.T) {
	got := metricNames(`histogram_quantile(0.95, sum by (le, outcome) (rate(kiln_build_duration_seconds_bucket{project=~"$project"}[1h]))) / on (x) kiln_machines - 2`)
	if strings.Join(got, " ") != "kiln_build_duration_seconds_bucket kiln_machines" {
		t.Errorf("metric names: %v", got)
	}
}
