package proxy

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/metrics"
)

func value(c prometheus.Collector) float64 {
	var m dto.Metric
	c.(prometheus.Metric).Write(&m)
	return m.GetCounter().GetValue() + m.GetGauge().GetValue() + float64(m.GetHistogram().GetSampleCount())
}

// A request that wakes a machine is held (and counted as held) until the machine
// listens; the wake, its latency, the answer's status and the upstream latency are
// counted under the app. An app that does not exist leaves no series.
func TestProxyMetrics(t *testing.T) {
	f := newFake()
	f.slowWake = 300 * time.Millisecond
	f.add(t, "p1", "pm", machine.Suspended, web("suspend"))
	p := startProxy(t, f, time.Hour)
	held := metrics.ProxyHeld.WithLabelValues("pm")
	done := make(chan int)
	go func() {
		code, _ := get(t, p, "pm.kiln.internal", "/")
		done <- code
	}()
	sawHeld := false
	deadline := time.Now().Add(5 * time.Second)
	for !sawHeld && time.Now().Before(deadline) {
		sawHeld = value(held) == 1
		time.Sleep(5 * time.Millisecond)
	}
	if code := <-done; code != 200 {
		t.Fatalf("request: %d", code)
	}
	if !sawHeld {
		t.Error("kiln_proxy_held_requests{app=pm} never showed the held request")
	}
	for name, c := range map[string]prometheus.Collector{
		"held now":  held,
		"wakes ok":  metrics.ProxyWakes.WithLabelValues("pm", "ok"),
		"wake time": metrics.ProxyWake.WithLabelValues("pm").(prometheus.Collector),
		"200s":      metrics.ProxyRequests.WithLabelValues("pm", "200"),
		"upstream":  metrics.ProxyUpstream.WithLabelValues("pm").(prometheus.Collector),
	} {
		want := 1.0
		if name == "held now" {
			want = 0
		}
		if got := value(c); got != want {
			t.Errorf("%s: %v, want %v", name, got, want)
		}
	}
	get(t, p, "nosuchapp.kiln.internal", "/")
	mfs, _ := metrics.NewRegistry().Gather()
	for _, mf := range mfs {
		for _, m := range mf.Metric {
			for _, l := range m.Label {
				if l.GetValue() == "nosuchapp" {
					t.Errorf("%s has a series for an app that does not exist", mf.GetName())
				}
			}
		}
	}
}
