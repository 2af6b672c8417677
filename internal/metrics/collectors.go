package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kilnhq/kiln/internal/capacity"
)

// scrapeTimeout bounds what one collector may spend reading state for a scrape.
const scrapeTimeout = 5 * time.Second

// MachineCount is how many machines of an app are in a state.
type MachineCount struct {
	App, State string
	Count      int
}

// MachineStates reports kiln_machines: the machines of each app in each state, read from
// the store when scraped. Count must answer in one query (a GROUP BY), however many
// machines there are.
type MachineStates struct {
	Count func(ctx context.Context) ([]MachineCount, error)
}

var machinesDesc = prometheus.NewDesc("kiln_machines", "Machines of each app in each state (destroyed ones are not counted).", []string{LabelApp, "state"}, nil)

func (c MachineStates) Describe(ch chan<- *prometheus.Desc) { ch <- machinesDesc }

func (c MachineStates) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	counts, err := c.Count(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(machinesDesc, err)
		return
	}
	for _, n := range counts {
		ch <- prometheus.MustNewConstMetric(machinesDesc, prometheus.GaugeValue, float64(n.Count), n.App, n.State)
	}
}

// Capacity reports what each host of a ledger offers, what runs there, and the
// overcommit the operator set, read from the ledger when scraped.
type Capacity struct {
	Ledger *capacity.Ledger
}

var (
	hostLabels         = []string{"host"}
	cpusOfferedDesc    = prometheus.NewDesc("kiln_host_cpus_offered", "vCPUs the host offers to machines: (CPUs - reserve) x CPU overcommit.", hostLabels, nil)
	cpusUsedDesc       = prometheus.NewDesc("kiln_host_cpus_used", "vCPUs held by the machines and builders running on the host.", hostLabels, nil)
	memOfferedDesc     = prometheus.NewDesc("kiln_host_memory_offered_bytes", "Memory the host offers to machines: (memory - reserve) x memory overcommit.", hostLabels, nil)
	memUsedDesc        = prometheus.NewDesc("kiln_host_memory_used_bytes", "Memory held by the machines and builders running on the host.", hostLabels, nil)
	cpuOvercommitDesc  = prometheus.NewDesc("kiln_host_cpu_overcommit_ratio", "The CPU overcommit ratio the operator set for the host.", hostLabels, nil)
	memOvercommitDesc  = prometheus.NewDesc("kiln_host_memory_overcommit_ratio", "The memory overcommit ratio the operator set for the host.", hostLabels, nil)
	hostCordonedDesc   = prometheus.NewDesc("kiln_host_cordoned", "1 if the host is cordoned (takes nothing new).", hostLabels, nil)
	capacityQueuedDesc = prometheus.NewDesc("kiln_capacity_queued_requests", "Starts waiting in the capacity queue for room on a host.", nil, nil)
)

func (c Capacity) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{cpusOfferedDesc, cpusUsedDesc, memOfferedDesc, memUsedDesc, cpuOvercommitDesc, memOvercommitDesc, hostCordonedDesc, capacityQueuedDesc} {
		ch <- d
	}
}

func (c Capacity) Collect(ch chan<- prometheus.Metric) {
	hosts, used := c.Ledger.Hosts()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, h := range hosts {
		u := used[h.Name]
		gauge(cpusOfferedDesc, float64(h.AllowedCPUs()), h.Name)
		gauge(cpusUsedDesc, float64(u.CPUs), h.Name)
		gauge(memOfferedDesc, float64(int64(h.AllowedMemoryMiB())<<20), h.Name)
		gauge(memUsedDesc, float64(int64(u.MemoryMiB)<<20), h.Name)
		gauge(cpuOvercommitDesc, h.CPURatio, h.Name)
		gauge(memOvercommitDesc, h.MemRatio, h.Name)
		cordoned := 0.0
		if h.Cordoned {
			cordoned = 1
		}
		gauge(hostCordonedDesc, cordoned, h.Name)
	}
	gauge(capacityQueuedDesc, float64(c.Ledger.Queued()))
}
