package metrics

import (
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

func filter(mfs []*dto.MetricFamily, reaches Reaches) []*dto.MetricFamily {
	out := mfs[:0]
	for _, mf := range mfs {
		kept := mf.Metric[:0]
		for _, m := range mf.Metric {
			if owned(m, reaches) {
				kept = append(kept, m)
			}
		}
		if len(kept) > 0 {
			mf.Metric = kept
			out = append(out, mf)
		}
	}
	return out
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
