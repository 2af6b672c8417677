package metrics

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/kilnhq/kiln/internal/capacity"
)

// A scoped gather keeps a series by its app label, or else its project label; a series
// with neither is the operator's. A builder's series name its internal app, and a project
// label beside it does not let a project's token see it.
func TestScopedKeepsOnlyWhatTheTokenReaches(t *testing.T) {
	r := prometheus.NewRegistry()
	apps := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "t_app_total"}, []string{"app"})
	projects := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "t_project_total"}, []string{"project"})
	both := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "t_both_total"}, []string{"app", "project"})
	host := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "t_host_total"}, []string{"host"})
	r.MustRegister(apps, projects, both, host)
	apps.WithLabelValues("a").Inc()
	apps.WithLabelValues("b").Inc()
	projects.WithLabelValues("pa").Inc()
	projects.WithLabelValues("pb").Inc()
	both.WithLabelValues("kiln-builders", "pa").Inc()
	host.WithLabelValues("h1").Inc()

	reaches := func(kind, name string) bool { return kind == "app" && name == "a" || kind == "project" && name == "pa" }
	mfs, err := Scoped(r, reaches).Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := render(mfs)
	want := "t_app_total{app=a} 1\nt_project_total{project=pa} 1"
	if got != want {
		t.Errorf("scoped gather:\n%s\nwant\n%s", got, want)
	}
}

func TestMachineStatesAndCapacity(t *testing.T) {
	l := capacity.NewLedger(capacity.Host{Name: "h1", CPUs: 4, MemoryMiB: 4096, CPURatio: 2, MemRatio: 1, ReserveCPUs: 1})
	if _, err := l.Reserve(context.Background(), "m1", capacity.Request{Size: capacity.Size{CPUs: 2, MemoryMiB: 1024}}, 0, nil); err != nil {
		t.Fatal(err)
	}
	// A start that does not fit waits in the queue.
	queued := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go l.Reserve(ctx, "m2", capacity.Request{Size: capacity.Size{CPUs: 1, MemoryMiB: 4000}}, time.Minute, func(int, error) { close(queued) })
	<-queued

	expect(t, Capacity{Ledger: l},
		"kiln_capacity_queued_requests 1",
		"kiln_host_cpus_offered{host=h1} 6",
		"kiln_host_cpus_used{host=h1} 2",
		"kiln_host_memory_used_bytes{host=h1} 1.073741824e+09",
		"kiln_host_cpu_overcommit_ratio{host=h1} 2",
		"kiln_host_cordoned{host=h1} 0")

	ms := MachineStates{Count: func(context.Context) ([]MachineCount, error) {
		return []MachineCount{{"a", "started", 3}, {"b", "stopped", 1}}, nil
	}}
	expect(t, ms, "kiln_machines{app=a,state=started} 3", "kiln_machines{app=b,state=stopped} 1")
}

// Instances are reported under Fly's names, CPU in centiseconds as Fly counts it, and
// the network as the guest sees it.
func TestInstancesUnderFlysNames(t *testing.T) {
	c := Instances{List: func(context.Context) []Instance {
		return []Instance{{App: "a", ID: "m1", CPU: &CPUTime{User: 1.5, System: .25}, MemoryTotal: 256 << 20, MemoryHost: 300 << 20,
			Disks: []Disk{{Device: "8:0", ReadsCompleted: 4, WritesCompleted: 5, BytesRead: 4096, BytesWritten: 1024}},
			Net:   &Net{RecvBytes: 100, SentBytes: 200}}}
	}}
	expect(t, c,
		"fly_instance_cpu{app=a,instance=m1,mode=system} 25",
		"fly_instance_cpu{app=a,instance=m1,mode=user} 150",
		"fly_instance_disk_sectors_read{app=a,device=8:0,instance=m1} 8",
		"fly_instance_memory_mem_total{app=a,instance=m1} 2.68435456e+08",
		"kiln_instance_memory_host_bytes{app=a,instance=m1} 3.145728e+08",
		"fly_instance_net_recv_bytes{app=a,device=eth0,instance=m1} 100",
		"fly_instance_net_sent_bytes{app=a,device=eth0,instance=m1} 200")
}

// What the guest's agent reports is served under Fly's names and units: memory in bytes,
// load by minutes, filesystems by mount; a mount a guest lists twice is served once (a
// duplicate series would fail the whole scrape).
func TestInstancesGuestStats(t *testing.T) {
	fs := Filesystem{Mount: "/", Blocks: 1000, BlocksFree: 400, BlocksAvail: 300, BlockSize: 4096}
	c := Instances{List: func(context.Context) []Instance {
		return []Instance{{App: "a", ID: "m1", Guest: &Guest{MemFree: 1 << 20, MemAvailable: 2 << 20, Buffers: 3, Cached: 4,
			Load: [3]float64{0.5, 1, 1.5}, Filesystems: []Filesystem{fs, {Mount: "/data", Blocks: 7, BlockSize: 1024}, fs}}}}
	}}
	expect(t, c,
		"fly_instance_memory_mem_free{app=a,instance=m1} 1.048576e+06",
		"fly_instance_memory_mem_available{app=a,instance=m1} 2.097152e+06",
		"fly_instance_memory_buffers{app=a,instance=m1} 3",
		"fly_instance_memory_cached{app=a,instance=m1} 4",
		"fly_instance_load_average{app=a,instance=m1,minutes=1} 0.5",
		"fly_instance_load_average{app=a,instance=m1,minutes=5} 1",
		"fly_instance_load_average{app=a,instance=m1,minutes=15} 1.5",
		"fly_instance_filesystem_blocks{app=a,instance=m1,mount=/} 1000",
		"fly_instance_filesystem_blocks_free{app=a,instance=m1,mount=/} 400",
		"fly_instance_filesystem_blocks_avail{app=a,instance=m1,mount=/} 300",
		"fly_instance_filesystem_block_size{app=a,instance=m1,mount=/} 4096",
		"fly_instance_filesystem_blocks{app=a,instance=m1,mount=/data} 7")
}

// render writes gathered series one a line: name{label=value,...} value.
func render(mfs []*dto.MetricFamily) string {
	var lines []string
	for _, mf := range mfs {
		for _, m := range mf.Metric {
			var ls []string
			for _, l := range m.Label {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			name := mf.GetName()
			if len(ls) > 0 {
				name += "{" + strings.Join(ls, ",") + "}"
			}
			v := m.GetGauge().GetValue() + m.GetCounter().GetValue() + m.GetUntyped().GetValue()
			lines = append(lines, fmt.Sprintf("%s %v", name, v))
		}
	}
	return strings.Join(lines, "\n")
}

// expect collects c and checks that every line of want is among its series.
func expect(t *testing.T, c prometheus.Collector, want ...string) {
	t.Helper()
	r := prometheus.NewPedanticRegistry()
	r.MustRegister(c)
	mfs, err := r.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := render(mfs)
	have := map[string]bool{}
	for _, l := range strings.Split(got, "\n") {
		have[l] = true
	}
	for _, w := range want {
		if !have[w] {
			t.Errorf("missing %s in\n%s", w, got)
		}
	}
}

// A deleted app's series go, and only its: another tenant may take the name.
func TestForgetApp(t *testing.T) {
	MachineBoot.WithLabelValues("gone").Observe(1)
	ProxyRequests.WithLabelValues("gone", "200").Inc()
	MachineBoot.WithLabelValues("kept").Observe(1)
	if n := ForgetApp("gone"); n != 2 {
		t.Errorf("ForgetApp dropped %d series, want 2", n)
	}
	r := prometheus.NewRegistry()
	r.MustRegister(MachineBoot)
	mfs, _ := r.Gather()
	if n := len(mfs[0].GetMetric()); len(mfs) != 1 || n != 1 {
		t.Errorf("%d boot series left, want kept's only", n)
	}
	ForgetApp("kept")
}
