// Command kiln-bench measures the foundation: boot to agent-ready (split into VMM start,
// kernel and init), exec round trip, stdout throughput and VMM memory overhead. It prints
// a table for people and writes JSON for scripts (make bench).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kilnhq/kiln/internal/assets"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/vmm/qemu"
	"github.com/kilnhq/kiln/internal/vmrun"
)

type result struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Unit  string  `json:"unit"`
	Note  string  `json:"note,omitempty"`
}

type report struct {
	Date        string   `json:"date"`
	Host        string   `json:"host"`
	VMM         string   `json:"vmm"`
	Accelerator string   `json:"accelerator"`
	GuestKernel string   `json:"guest_kernel"`
	Results     []result `json:"results"`
}

func pct(ds []time.Duration, p float64) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(float64(len(s)-1)*p + 0.5)
	return s[i]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }

func main() {
	out := flag.String("out", "bench-results/bench.json", "where to write the JSON report")
	boots := flag.Int("boots", 10, "boots to time")
	execs := flag.Int("execs", 100, "execs of `true` to time")
	only := flag.String("only", "", "run one part alone: boot (both guest kernels), placement or metrics (no VM; for repeated runs on a quiet host), builds or deploys")
	flag.Parse()
	if *only == "deploy-child" && os.Getenv(deployEnv) != "" {
		if err := deployChild(context.Background(), *out); err != nil {
			fmt.Fprintln(os.Stderr, "kiln-bench:", err)
			os.Exit(1)
		}
		return
	}
	if *only != "" && *only != "boot" && *only != "placement" && *only != "metrics" && *only != "builds" && *only != "deploys" {
		fmt.Fprintf(os.Stderr, "kiln-bench: -only %q: the parts that run alone are boot, placement, metrics, builds and deploys\n", *only)
		os.Exit(2)
	}
	if err := run(*out, *boots, *execs, *only); err != nil {
		fmt.Fprintf(os.Stderr, "kiln-bench: %v\n", err)
		os.Exit(1)
	}
}

func run(out string, boots, execs int, only string) error {
	ctx := context.Background()
	dataDir := os.Getenv("KILN_DATA_DIR")
	if dataDir == "" {
		dataDir = "/var/lib/kiln"
	}
	exe, _ := os.Executable()
	init := os.Getenv("KILN_INIT")
	if init == "" {
		init = filepath.Join(filepath.Dir(exe), "kiln-init")
		if _, err := os.Stat(init); err != nil {
			init = "bin/kiln-init"
		}
	}
	set, err := assets.Ensure(ctx, assets.Options{Dir: filepath.Join(dataDir, "assets"), Init: init, Kernel: assets.KernelKiln, Log: os.Stderr})
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "kiln-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	rt := &vmrun.Runtime{DataDir: work, Driver: &qemu.Driver{}, Assets: set}
	accel, why, err := (&vmrun.Runtime{DataDir: dataDir, Driver: rt.Driver, Assets: set}).ResolveAccel(ctx, os.Stderr)
	if err != nil {
		return err
	}
	rt.Accel = accel
	host, _ := os.Hostname()
	rep := report{Date: time.Now().UTC().Format(time.RFC3339), Host: host, VMM: "qemu", Accelerator: fmt.Sprintf("%s (%s)", accel, why)}
	add := func(name string, v float64, unit, note string) {
		rep.Results = append(rep.Results, result{name, v, unit, note})
	}
	if only == "placement" {
		if err := benchPlacement(ctx, work, add); err != nil {
			return fmt.Errorf("placement: %w", err)
		}
		return finish(rep, out)
	}
	if only == "metrics" {
		if err := benchMetrics(ctx, work, add); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		return finish(rep, out)
	}
	if only == "builds" {
		if err := benchBuilds(ctx, rt, dataDir, work, add); err != nil {
			return fmt.Errorf("builds: %w", err)
		}
		return finish(rep, out)
	}
	if only == "deploys" {
		if err := benchDeploysIsolated(ctx, add); err != nil {
			return fmt.Errorf("deploys: %w", err)
		}
		return finish(rep, out)
	}
	spec := vmrun.Spec{CPUs: 1, MemoryMiB: 512}
	if err := benchBoots(ctx, rt, init, dataDir, boots, spec, &rep, add); err != nil {
		return err
	}
	if only == "boot" {
		return finish(rep, out)
	}

	inst, err := rt.Boot(ctx, spec)
	if err != nil {
		return err
	}
	defer inst.Destroy(ctx)
	var rtts []time.Duration
	for i := 0; i < execs; i++ {
		start := time.Now()
		st, err := inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"true"}}, guest.IO{})
		if err != nil || st.Code != 0 {
			return fmt.Errorf("exec true: %v %+v", err, st)
		}
		rtts = append(rtts, time.Since(start))
	}
	add("exec_true_rtt_p50", ms(pct(rtts, 0.5)), "ms", fmt.Sprintf("%d execs", execs))
	add("exec_true_rtt_p95", ms(pct(rtts, 0.95)), "ms", "")

	const size = 256 << 20
	cw := &countWriter{}
	start := time.Now()
	if _, err := inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"head", "-c", strconv.Itoa(size), "/dev/zero"}}, guest.IO{Stdout: cw}); err != nil {
		return err
	}
	el := time.Since(start)
	if cw.n != size {
		return fmt.Errorf("throughput run got %d of %d bytes", cw.n, size)
	}
	add("stdout_throughput", float64(size)/el.Seconds()/1e6, "MB/s", "256 MiB from head -c /dev/zero")

	rss, guestRSS, private, err := vmmMemory(inst.VM.Handle().PID, spec.MemoryMiB)
	if err != nil {
		return err
	}
	add("vmm_rss_total", float64(rss)/1024, "MiB", fmt.Sprintf("guest has %d MiB, %.0f MiB of it resident", spec.MemoryMiB, float64(guestRSS)/1024))
	add("vmm_overhead_beyond_guest_ram", float64(private)/1024, "MiB", "private to the VMM, outside guest RAM (TCG code cache included)")
	add("vmm_rss_beyond_guest_ram", float64(rss-guestRSS)/1024, "MiB", "same, counting shared kernel/initramfs page cache")

	inst.Destroy(ctx)
	if err := benchResume(ctx, rt, add); err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	if err := benchMachines(ctx, rt, work, add); err != nil {
		return fmt.Errorf("machines: %w", err)
	}
	if err := benchProxy(ctx, add); err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	if err := benchBuilds(ctx, rt, dataDir, work, add); err != nil {
		return fmt.Errorf("builds: %w", err)
	}
	if err := benchDeploysIsolated(ctx, add); err != nil {
		return fmt.Errorf("deploys: %w", err)
	}
	if err := benchPlacement(ctx, work, add); err != nil {
		return fmt.Errorf("placement: %w", err)
	}
	if err := benchMetrics(ctx, work, add); err != nil {
		return fmt.Errorf("metrics: %w", err)
	}

	return finish(rep, out)
}

// finish prints the table and writes the JSON report.
func finish(rep report, out string) error {
	printTable(os.Stdout, rep)
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	b, _ := json.MarshalIndent(rep, "", "  ")
	if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Printf("\nJSON: %s\n", out)
	return nil
}

type countWriter struct{ n int64 }

func (w *countWriter) Write(p []byte) (int, error) { w.n += int64(len(p)); return len(p), nil }

// vmmMemory reads the VMM's memory from smaps, in KiB: its resident set, the part of it
// that is guest RAM (the anonymous mapping the size of the guest's memory), and the
// memory private to this VMM outside guest RAM, which is what each extra VM costs (the
// kernel and initramfs it maps are page cache shared by every VM).
func vmmMemory(pid, guestMiB int) (rss, guestRSS, private int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return 0, 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	var inGuest bool
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		n, _ := strconv.ParseInt(fields[1], 10, 64)
		switch fields[0] {
		case "Size:":
			inGuest = n == int64(guestMiB)*1024
		case "Rss:":
			rss += n
			if inGuest {
				guestRSS += n
			}
		case "Private_Dirty:", "Private_Clean:":
			if !inGuest {
				private += n
			}
		}
	}
	return rss, guestRSS, private, sc.Err()
}

func printTable(w io.Writer, rep report) {
	fmt.Fprintf(w, "kiln bench  %s  vmm=%s  accelerator=%s  guest kernel %s\n\n", rep.Date, rep.VMM, rep.Accelerator, rep.GuestKernel)
	fmt.Fprintf(w, "%-32s %12s  %-6s %s\n", "metric", "value", "unit", "note")
	fmt.Fprintf(w, "%-32s %12s  %-6s %s\n", strings.Repeat("-", 32), strings.Repeat("-", 12), "------", "----")
	for _, r := range rep.Results {
		fmt.Fprintf(w, "%-32s %12.1f  %-6s %s\n", r.Name, r.Value, r.Unit, r.Note)
	}
}
