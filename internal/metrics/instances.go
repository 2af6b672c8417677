package metrics

import (
	"context"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
)

// Instance is what the host knows of one running machine's use of it: its VMM's control
// group (CPU, memory, disk) and its TAP device (network). A field the host cannot read
// (no cgroup I/O accounting, no network) is left nil.
type Instance struct {
	App, ID string
	// CPU is the VMM's CPU time in seconds, user and system.
	CPU *CPUTime
	// MemoryTotal is the guest's RAM, as configured; MemoryHost what the VMM's group
	// holds on the host (guest RAM it touched, the VMM's own, page cache of its disks).
	MemoryTotal, MemoryHost int64
	Disks                   []Disk
	Net                     *Net
	// Guest is what only the guest knows, as its agent last answered; nil before it has
	// (or when its agent predates the question).
	Guest *Guest
}

// Guest is the guest's own view: memory in bytes from its /proc/meminfo, its load
// averages over 1, 5 and 15 minutes, and its filesystems.
type Guest struct {
	MemFree, MemAvailable, Buffers, Cached uint64
	Load                                   [3]float64
	Filesystems                            []Filesystem
}

// Filesystem is statfs of one guest mount: Blocks of BlockSize bytes.
type Filesystem struct {
	Mount                                      string
	Blocks, BlocksFree, BlocksAvail, BlockSize uint64
}

// CPUTime is CPU time in seconds.
type CPUTime struct{ User, System float64 }

// Disk is one block device's I/O by the VMM, as its group's accounting counts it.
type Disk struct {
	Device                          string
	ReadsCompleted, WritesCompleted uint64
	BytesRead, BytesWritten         uint64
}

// Net is the guest's network traffic, as seen from the guest (what the host's TAP device
// received is what the guest sent).
type Net struct {
	RecvBytes, RecvPackets, RecvErrs, RecvDrop uint64
	SentBytes, SentPackets, SentErrs, SentDrop uint64
}

// Instances reports each running machine of this host under Fly's fly_instance_* names
// where one means the same thing, so that dashboards written for Fly work. Fly reads
// them inside the guest; kiln reads them from the host (the VMM's cgroup and the TAP
// device), so a few differ: CPU is the VMM's, counted in centiseconds like Fly's; disks
// are named by the host's device numbers; the network device is the guest's, eth0.
type Instances struct {
	List func(ctx context.Context) []Instance
}

var (
	instanceLabels  = []string{LabelApp, "instance"}
	cpuDesc         = prometheus.NewDesc("fly_instance_cpu", "CPU time of the machine's VMM in centiseconds (as Fly counts it), by mode.", []string{LabelApp, "instance", "mode"}, nil)
	memTotalDesc    = prometheus.NewDesc("fly_instance_memory_mem_total", "The machine's guest memory in bytes.", instanceLabels, nil)
	memHostDesc     = prometheus.NewDesc("kiln_instance_memory_host_bytes", "Host memory the machine's VMM cgroup holds: guest memory touched, the VMM itself and its disks' page cache.", instanceLabels, nil)
	diskLabels      = []string{LabelApp, "instance", "device"}
	diskReadsDesc   = prometheus.NewDesc("fly_instance_disk_reads_completed", "Reads completed by the machine's VMM on a host block device.", diskLabels, nil)
	diskWritesDesc  = prometheus.NewDesc("fly_instance_disk_writes_completed", "Writes completed by the machine's VMM on a host block device.", diskLabels, nil)
	diskSecReadDesc = prometheus.NewDesc("fly_instance_disk_sectors_read", "512-byte sectors read by the machine's VMM on a host block device.", diskLabels, nil)
	diskSecWritDesc = prometheus.NewDesc("fly_instance_disk_sectors_written", "512-byte sectors written by the machine's VMM on a host block device.", diskLabels, nil)
	netLabels       = diskLabels
	netDescs        = map[string]*prometheus.Desc{}
	// From the guest agent, under Fly's names and units.
	memFreeDesc      = prometheus.NewDesc("fly_instance_memory_mem_free", "The guest's free memory in bytes (MemFree of its /proc/meminfo).", instanceLabels, nil)
	memAvailableDesc = prometheus.NewDesc("fly_instance_memory_mem_available", "Memory in bytes the guest can use without swapping (MemAvailable of its /proc/meminfo).", instanceLabels, nil)
	memBuffersDesc   = prometheus.NewDesc("fly_instance_memory_buffers", "The guest's buffers in bytes (Buffers of its /proc/meminfo).", instanceLabels, nil)
	memCachedDesc    = prometheus.NewDesc("fly_instance_memory_cached", "The guest's page cache in bytes (Cached of its /proc/meminfo).", instanceLabels, nil)
	loadDesc         = prometheus.NewDesc("fly_instance_load_average", "The guest's load average (its /proc/loadavg) over 1, 5 and 15 minutes.", []string{LabelApp, "instance", "minutes"}, nil)
	fsLabels         = []string{LabelApp, "instance", "mount"}
	fsBlocksDesc     = prometheus.NewDesc("fly_instance_filesystem_blocks", "Size in blocks of a guest filesystem: its root and each volume (statfs in the guest).", fsLabels, nil)
	fsFreeDesc       = prometheus.NewDesc("fly_instance_filesystem_blocks_free", "Free blocks of a guest filesystem.", fsLabels, nil)
	fsAvailDesc      = prometheus.NewDesc("fly_instance_filesystem_blocks_avail", "Free blocks of a guest filesystem that unprivileged users may use.", fsLabels, nil)
	fsBlockSizeDesc  = prometheus.NewDesc("fly_instance_filesystem_block_size", "Block size in bytes of a guest filesystem.", fsLabels, nil)
	loadMinutes      = [3]string{"1", "5", "15"}
)

// netNames are Fly's network series kiln has, in the order of netValues.
var netNames = []string{
	"fly_instance_net_recv_bytes", "fly_instance_net_recv_packets", "fly_instance_net_recv_errs", "fly_instance_net_recv_drop",
	"fly_instance_net_sent_bytes", "fly_instance_net_sent_packets", "fly_instance_net_sent_errs", "fly_instance_net_sent_drop",
}

func netValues(n *Net) []uint64 {
	return []uint64{n.RecvBytes, n.RecvPackets, n.RecvErrs, n.RecvDrop, n.SentBytes, n.SentPackets, n.SentErrs, n.SentDrop}
}

func init() {
	for _, name := range netNames {
		netDescs[name] = prometheus.NewDesc(name, "The machine's network traffic on its interface, seen from the guest (counted on its TAP device).", netLabels, nil)
	}
}

func (c Instances) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{cpuDesc, memTotalDesc, memHostDesc, diskReadsDesc, diskWritesDesc, diskSecReadDesc, diskSecWritDesc,
		memFreeDesc, memAvailableDesc, memBuffersDesc, memCachedDesc, loadDesc, fsBlocksDesc, fsFreeDesc, fsAvailDesc, fsBlockSizeDesc} {
		ch <- d
	}
	for _, name := range netNames {
		ch <- netDescs[name]
	}
}

func (c Instances) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, in := range c.List(ctx) {
		if in.CPU != nil {
			counter(cpuDesc, in.CPU.User*100, in.App, in.ID, "user")
			counter(cpuDesc, in.CPU.System*100, in.App, in.ID, "system")
		}
		if in.MemoryTotal > 0 {
			ch <- prometheus.MustNewConstMetric(memTotalDesc, prometheus.GaugeValue, float64(in.MemoryTotal), in.App, in.ID)
		}
		if in.MemoryHost > 0 {
			ch <- prometheus.MustNewConstMetric(memHostDesc, prometheus.GaugeValue, float64(in.MemoryHost), in.App, in.ID)
		}
		for _, d := range in.Disks {
			counter(diskReadsDesc, float64(d.ReadsCompleted), in.App, in.ID, d.Device)
			counter(diskWritesDesc, float64(d.WritesCompleted), in.App, in.ID, d.Device)
			counter(diskSecReadDesc, float64(d.BytesRead/512), in.App, in.ID, d.Device)
			counter(diskSecWritDesc, float64(d.BytesWritten/512), in.App, in.ID, d.Device)
		}
		if in.Net != nil {
			for i, v := range netValues(in.Net) {
				counter(netDescs[netNames[i]], float64(v), in.App, in.ID, "eth0")
			}
		}
		if g := in.Guest; g != nil {
			gauge(memFreeDesc, float64(g.MemFree), in.App, in.ID)
			gauge(memAvailableDesc, float64(g.MemAvailable), in.App, in.ID)
			gauge(memBuffersDesc, float64(g.Buffers), in.App, in.ID)
			gauge(memCachedDesc, float64(g.Cached), in.App, in.ID)
			for i, l := range g.Load {
				gauge(loadDesc, l, in.App, in.ID, loadMinutes[i])
			}
			seen := map[string]bool{}
			for _, f := range g.Filesystems {
				// A mount listed twice would make the scrape fail as a duplicate series.
				if seen[f.Mount] || !utf8.ValidString(f.Mount) {
					continue
				}
				seen[f.Mount] = true
				gauge(fsBlocksDesc, float64(f.Blocks), in.App, in.ID, f.Mount)
				gauge(fsFreeDesc, float64(f.BlocksFree), in.App, in.ID, f.Mount)
				gauge(fsAvailDesc, float64(f.BlocksAvail), in.App, in.ID, f.Mount)
				gauge(fsBlockSizeDesc, float64(f.BlockSize), in.App, in.ID, f.Mount)
			}
		}
	}
}
