package machines

import (
	"context"

	"github.com/kilnhq/kiln/internal/cgroup"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/network"
)

// Usage reads what each machine running on this host uses of it, for /metrics: CPU,
// memory and disk I/O from its VMM's cgroup (from the VMM's process where kiln confines
// none), and traffic from its TAP device. A machine whose numbers cannot be read (its VM
// stopped meanwhile) is listed with what could be. What only the guest knows (available
// memory, load, filesystems) its agent answers, within guestStatsWait or from its last
// answer.
func (s *Service) Usage(ctx context.Context) []metrics.Instance {
	cg, cgErr := cgroup.Host()
	running := map[string]*vmInstance{}
	sources := map[string]guestStatsSource{}
	for id, vm := range s.sup.RunningVMs() {
		v, ok := vm.(*vmInstance)
		if !ok || v.inst == nil {
			continue
		}
		running[id] = v
		if a := v.agent(); a != nil && a.Hello.Serves(guest.OpStats) {
			sources[id] = a
		}
	}
	stats := s.guest.read(ctx, sources)
	var out []metrics.Instance
	for id, v := range running {
		cfg := v.inst.Config
		in := metrics.Instance{App: v.rec.App, ID: id, MemoryTotal: int64(cfg.MemoryMiB) << 20}
		var u cgroup.Usage
		var err error
		switch {
		case cfg.Confine.Cgroup != "" && cgErr == nil:
			u, err = cg.Usage(cfg.Confine.Cgroup)
		case v.inst.VM != nil:
			u = cgroup.ProcUsage([]int{v.inst.VM.Handle().PID})
		}
		if err == nil {
			in.CPU, in.MemoryHost = &metrics.CPUTime{User: u.UserSeconds, System: u.SystemSeconds}, u.MemoryBytes
			for _, io := range u.IO {
				in.Disks = append(in.Disks, metrics.Disk{Device: io.Device, ReadsCompleted: io.Reads, WritesCompleted: io.Writes,
					BytesRead: io.ReadBytes, BytesWritten: io.WriteBytes})
			}
		}
		if len(cfg.NICs) > 0 {
			// The host's TAP receives what the guest sends, and sends what it receives.
			if c, err := network.DeviceCounters(cfg.NICs[0].HostDev); err == nil {
				in.Net = &metrics.Net{RecvBytes: c.TxBytes, RecvPackets: c.TxPackets, RecvErrs: c.TxErrors, RecvDrop: c.TxDropped,
					SentBytes: c.RxBytes, SentPackets: c.RxPackets, SentErrs: c.RxErrors, SentDrop: c.RxDropped}
			}
		}
		if st, ok := stats[id]; ok {
			in.Guest = guestUsage(st)
		}
		out = append(out, in)
	}
	return out
}

func guestUsage(st guest.Stats) *metrics.Guest {
	g := &metrics.Guest{MemFree: st.MemFree, MemAvailable: st.MemAvailable, Buffers: st.Buffers, Cached: st.Cached, Load: st.Load}
	for _, f := range st.Filesystems {
		g.Filesystems = append(g.Filesystems, metrics.Filesystem(f))
	}
	return g
}
