package metrics

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Reaches says whether a token reaches the app or project (kind "app" or "project")
// called name.
type Reaches func(kind, name string) bool

// Scoped gathers from g and keeps only the series a token that is not the operator's may
// see: those whose app label, or else project label, names something it reaches. A series
// with neither (a host's capacity, the store, the process) is the operator's alone. It
// filters what was gathered, not metric by metric, so that a metric added later is
// covered without anyone remembering to.
func Scoped(g prometheus.Gatherer, reaches Reaches) prometheus.Gatherer {
	return prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		mfs, err := g.Gather()
		return filter(mfs, reaches), err
	})
}

// filter returns the families of mfs with only the series reaches allows, leaving mfs
// as they were: Shared hands the same families to every scrape.
func filter(mfs []*dto.MetricFamily, reaches Reaches) []*dto.MetricFamily {
	var out []*dto.MetricFamily
	for _, mf := range mfs {
		var kept []*dto.Metric
		for _, m := range mf.Metric {
			if owned(m, reaches) {
				kept = append(kept, m)
			}
		}
		if len(kept) > 0 {
			out = append(out, &dto.MetricFamily{Name: mf.Name, Help: mf.Help, Type: mf.Type, Unit: mf.Unit, Metric: kept})
		}
	}
	return out
}

// Shared gathers from g at most once per every, and gives every caller within it (and
// those waiting while it gathers) the same families, which they must not change. Any
// token may scrape, as often as it likes, and a gather reads the state of everything on
// the host (every running machine's cgroup and TAP counters, the store) before Scoped
// drops what the token does not reach: with Shared, tenants' scrapes cost the host one
// gather per interval however many come.
func Shared(g prometheus.Gatherer, every time.Duration) prometheus.Gatherer {
	var (
		mu  sync.Mutex
		at  time.Time
		mfs []*dto.MetricFamily
		err error
	)
	return prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		mu.Lock()
		defer mu.Unlock()
		if at.IsZero() || time.Since(at) >= every {
			mfs, err = g.Gather()
			at = time.Now()
		}
		return mfs, err
	})
}

// owned says whether the series belongs to something the token reaches. The app label
// decides where there is one (a builder's series name its internal app, which no scoped
// token reaches, and a project label beside it must not let it through).
func owned(m *dto.Metric, reaches Reaches) bool {
	project := ""
	for _, l := range m.GetLabel() {
		switch l.GetName() {
		case LabelApp:
			return reaches("app", l.GetValue())
		case LabelProject:
			project = l.GetValue()
		}
	}
	return project != "" && reaches("project", project)
}
