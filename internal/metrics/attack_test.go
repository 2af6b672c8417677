package metrics

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// collects counts how often a scrape made the host read its state.
type collects struct {
	n    int
	desc *prometheus.Desc
}

func (c *collects) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }
func (c *collects) Collect(ch chan<- prometheus.Metric) {
	c.n++
	for _, app := range []string{"a", "b"} {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, 1, app)
	}
}

// Any token may scrape, and a scrape reads the state of every machine on the host (its
// cgroup and TAP counters) before the scope drops what the token does not reach: a
// tenant scraping in a loop must not make the host read everything each time. Scrapes
// within the interval share one gather, and each token's filter leaves the shared
// families as they were for the next token.
func TestScopedScrapesShareOneGather(t *testing.T) {
	c := &collects{desc: prometheus.NewDesc("t_state", "", []string{LabelApp}, nil)}
	r := prometheus.NewRegistry()
	r.MustRegister(c)
	shared := Shared(r, time.Hour)
	for i := range 50 {
		app := []string{"a", "b"}[i%2]
		mfs, err := Scoped(shared, func(kind, name string) bool { return kind == "app" && name == app }).Gather()
		if err != nil {
			t.Fatal(err)
		}
		if got := render(mfs); got != "t_state{app="+app+"} 1" {
			t.Fatalf("scrape %d by %s's token: %q", i, app, got)
		}
	}
	if c.n != 1 {
		t.Errorf("50 scrapes within the interval read the host's state %d times", c.n)
	}
}
