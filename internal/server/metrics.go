package server

import (
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/metrics"
)

// defaultMetrics serves a server made without a registry: the process-wide instruments.
var defaultMetrics = metrics.NewRegistry()

// metrics serves GET /metrics in Prometheus' text format. The operator's token sees every
// series; any other token only those of the apps and projects it reaches, and nothing of
// the hosts, the store or the process.
func (s *Server) metrics(w http.ResponseWriter, r *http.Request) error {
	var g prometheus.Gatherer = defaultMetrics
	if s.Metrics != nil {
		g = s.Metrics
	}
	if id, _ := auth.From(r.Context()); !id.Operator() {
		g = metrics.Scoped(s.tenantMetrics.from(g), func(kind, name string) bool { return id.Reaches(auth.Resource{Kind: kind, Name: name}) })
	}
	// A collector that fails (the store did not answer) leaves its series out and says
	// so in the log; the rest are served.
	promhttp.HandlerFor(g, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError, ErrorLog: metricsLog(s.logf(r.Context()))}).ServeHTTP(w, r)
	return nil
}

// tenantMetricsEvery is how often the scrapes of tokens other than the operator's gather:
// any token may scrape as often as it likes, and each gather reads the state of the
// whole host, so theirs share one gather per interval (metrics.Shared).
const tenantMetricsEvery = time.Second

// tenantMetrics makes, once, the shared gatherer of tenants' scrapes.
type tenantMetrics struct {
	once sync.Once
	g    prometheus.Gatherer
}

func (t *tenantMetrics) from(g prometheus.Gatherer) prometheus.Gatherer {
	t.once.Do(func() { t.g = metrics.Shared(g, tenantMetricsEvery) })
	return t.g
}

// metricsLog takes promhttp's complaints into the server's log.
type metricsLog func(format string, args ...any)

func (l metricsLog) Println(v ...any) { l("serving /metrics: %s", fmt.Sprint(v...)) }
