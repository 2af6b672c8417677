// Package metrics is kiln's Prometheus metrics, built with the official Go client: the
// definition of every metric, the collectors that read state when a scrape comes (machines
// by state, capacity, per-machine usage), and Scoped, which shows a token only the series
// it reaches. internal/server serves them at GET /metrics.
//
// The instruments (histograms and counters observed where things happen: a boot, a wake,
// a build, a query) are process-wide variables, as the process they describe is one; the
// packages that observe them import this one and nothing else of it. State read at scrape
// time belongs to one server and is registered on that server's registry (NewRegistry).
//
// Every series about an app carries an `app` label, every series about a build project a
// `project` label; Scoped relies on it, so a new metric about an app must carry one.
// Label values are always names kiln checked (an app, project or host that exists, a
// bounded set of reasons), never text a caller sent.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Labels that say whose a series is; Scoped reads them.
const (
	LabelApp     = "app"
	LabelProject = "project"
)

// latency is the bucket layout of the machine latency histograms: a resume from a
// snapshot takes tens of milliseconds, a cold boot under emulation several seconds.
var latency = []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}

var (
	// MachineBoot is the time from asking the VMM for a VM to the workload running.
	MachineBoot = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "kiln_machine_boot_seconds", Help: "Time to boot a machine's VM cold and start its workload.", Buckets: latency,
	}, []string{LabelApp})
	// MachineResume is the time to run a suspended machine's saved VM again.
	MachineResume = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "kiln_machine_resume_seconds", Help: "Time to resume a suspended machine's VM from its snapshot.", Buckets: latency,
	}, []string{LabelApp})

	// ProxyWake is what a request that woke a machine waited for it: start or resume,
	// and its service ports listening.
	ProxyWake = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "kiln_proxy_wake_seconds", Help: "Time for the proxy to wake a stopped or suspended machine until its ports listen.", Buckets: latency,
	}, []string{LabelApp})
	// ProxyWakes counts wakes by result ("ok", "failed").
	ProxyWakes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kiln_proxy_wakes_total", Help: "Machines the proxy woke on request, by result.",
	}, []string{LabelApp, "result"})
	// ProxyRequests counts HTTP requests to an app's machines by the status answered.
	ProxyRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kiln_proxy_requests_total", Help: "HTTP requests the proxy answered for an app, by status code.",
	}, []string{LabelApp, "code"})
	// ProxyUpstream is the time from handing a request to a machine to its response's
	// headers.
	ProxyUpstream = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "kiln_proxy_upstream_seconds", Help: "Time for a machine to answer a proxied HTTP request (to its response headers).",
		Buckets: prometheus.DefBuckets,
	}, []string{LabelApp})
	// ProxyHeld is the requests waiting now for a machine of the app to start or free up.
	ProxyHeld = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kiln_proxy_held_requests", Help: "Requests and connections the proxy holds now, waiting for a machine of the app to start or free up.",
	}, []string{LabelApp})
	// ProxyTCPConnections counts raw TCP connections piped to an app's machines.
	ProxyTCPConnections = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kiln_proxy_tcp_connections_total", Help: "TCP connections the proxy piped to an app's machines.",
	}, []string{LabelApp})

	// BuildDuration is one attempt's run time, by how the build ended.
	BuildDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "kiln_build_duration_seconds", Help: "Build attempts' run time, by outcome (succeeded, failed, canceled, infrastructure: retried or given up, interrupted: kiln stopped).",
		Buckets: []float64{1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600},
	}, []string{LabelProject, "outcome"})
	// BuildQueueWait is the time a build waited in its queue before an attempt started.
	BuildQueueWait = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "kiln_build_queue_wait_seconds", Help: "Time a build waited queued before an attempt started.",
		Buckets: []float64{.1, .5, 1, 5, 10, 30, 60, 300, 900, 3600},
	}, []string{LabelProject})
	// BuildCachedRatio is, for each successful build, its cached steps over its steps.
	BuildCachedRatio = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "kiln_build_cached_steps_ratio", Help: "Share of a successful build's steps that the cache answered.",
		Buckets: prometheus.LinearBuckets(0, .1, 11),
	}, []string{LabelProject})
	// BuildRetries counts attempts retried after the infrastructure failed, by reason
	// (RetryReason's names).
	BuildRetries = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kiln_build_infra_retries_total", Help: "Build attempts that ended in an infrastructure failure, by reason.",
	}, []string{LabelProject, "reason"})
	// BuildCacheUsed and BuildCacheSize are a project's cache volume, as read after its
	// last build.
	BuildCacheUsed = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kiln_build_cache_used_bytes", Help: "Bytes used on a project's build cache volume, read after its last build.",
	}, []string{LabelProject})
	BuildCacheSize = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kiln_build_cache_size_bytes", Help: "Size of a project's build cache volume, read after its last build.",
	}, []string{LabelProject})
	// BuildCacheResets counts caches emptied because GC could not keep them small.
	BuildCacheResets = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kiln_build_cache_resets_total", Help: "Times a project's build cache was emptied because it was too full after GC.",
	}, []string{LabelProject})

	// StoreQuery is the time of each database statement, by operation (StoreOperation).
	StoreQuery = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "kiln_store_query_seconds", Help: "Time of each database statement, by operation (statement and table, begin, commit, rollback).",
		Buckets: prometheus.ExponentialBuckets(.0001, 4, 8),
	}, []string{"operation"})
)

// instruments are the process-wide metrics every registry serves.
var instruments = []prometheus.Collector{
	MachineBoot, MachineResume,
	ProxyWake, ProxyWakes, ProxyRequests, ProxyUpstream, ProxyHeld, ProxyTCPConnections,
	BuildDuration, BuildQueueWait, BuildCachedRatio, BuildRetries, BuildCacheUsed, BuildCacheSize, BuildCacheResets,
	StoreQuery,
}

// ForgetApp drops every instrument's series about a deleted app: its name can be taken
// again, by another tenant, who must not inherit its counters, and apps that come and go
// must not grow the series for ever. It says how many series went.
func ForgetApp(app string) int {
	n := 0
	for _, c := range instruments {
		if v, ok := c.(interface {
			DeletePartialMatch(prometheus.Labels) int
		}); ok {
			n += v.DeletePartialMatch(prometheus.Labels{LabelApp: app})
		}
	}
	return n
}

// NewRegistry returns a registry with every instrument, the Go runtime's and the
// process's own metrics, and the given collectors of one server's state.
func NewRegistry(cs ...prometheus.Collector) *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(instruments...)
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	r.MustRegister(cs...)
	return r
}
