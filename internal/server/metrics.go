package server

import (
	"fmt"
	"net/http"

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
		g = metrics.Scoped(g, func(kind, name string) bool { return id.Reaches(auth.Resource{Kind: kind, Name: name}) })
	}
	// A collector that fails (the store did not answer) leaves its series out and says
	// so in the log; the rest are served.
	promhttp.HandlerFor(g, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError, ErrorLog: metricsLog(s.logf(r.Context()))}).ServeHTTP(w, r)
	return nil
}

// metricsLog takes promhttp's complaints into the server's log.
type metricsLog func(format string, args ...any)

func (l metricsLog) Println(v ...any) { l("serving /metrics: %s", fmt.Sprint(v...)) }
