package qemu_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/cgroup"
	"github.com/kilnhq/kiln/internal/guest"

	"github.com/kilnhq/kiln/internal/testutil"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/qemu"
	"github.com/kilnhq/kiln/internal/vmm/vmmtest"
	"github.com/kilnhq/kiln/internal/vmrun"
	"github.com/kilnhq/kiln/internal/volume"
)

func TestMain(m *testing.M) {
	os.Exit(testutil.Finish(m.Run()))
}

func TestConformance(t *testing.T) {
	testutil.RequireQEMU(t)
	vmmtest.Run(t, func(t *testing.T) *vmrun.Runtime {
		return testutil.Runtime(t, &qemu.Driver{})
	}, vmmtest.Options{})
}

// Debian's kernel stays the fallback (--kernel debian): with its modules in the
// initramfs and ACPI, it boots, runs a command, and powers off on the stop request (the
// ACPI power button; kiln's kernel answers the Ctrl-Alt-Del sent with it, which the
// conformance suite's StopIsGraceful covers).
func TestDebianKernelFallback(t *testing.T) {
	testutil.RequireQEMU(t)
	rt := testutil.Runtime(t, &qemu.Driver{})
	rt.Assets = testutil.DebianAssets(t)
	if rt.Assets.KernelName != "debian" || rt.Assets.KernelNoACPI {
		t.Fatalf("Debian's assets: %+v", rt.Assets)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	inst, err := rt.Boot(ctx, vmrun.Spec{CPUs: 1, MemoryMiB: 256})
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	defer inst.Destroy(context.Background())
	if k := inst.Agent.Hello.Kernel; !strings.HasSuffix(k, "-amd64") {
		t.Errorf("booted kernel %q, want Debian's", k)
	}
	var out bytes.Buffer
	if st, err := inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"sh", "-c", "ls /sys/bus/acpi/devices | head -1; echo ok"}}, guest.IO{Stdout: &out}); err != nil || st.Code != 0 || !strings.HasSuffix(out.String(), "ok\n") {
		t.Fatalf("exec: %v %+v %q", err, st, out.String())
	}
	start, grace := time.Now(), 30*time.Second
	if err := inst.VM.Stop(ctx, grace); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d >= grace {
		t.Errorf("Stop took %s: Debian's kernel ignored the power button", d)
	}
}

// TestConfined boots a VM and looks at its QEMU from the host: it runs as a user of its
// own (not root), under its seccomp filter, in the VM's cgroup with the VM's CPUs and
// memory (plus the VMM's overhead) as limits; its volume works; it stays so across a
// suspend and resume; and the cgroup and the user's claim go with the VM.
func TestConfined(t *testing.T) {
	testutil.RequireQEMU(t)
	if os.Geteuid() != 0 {
		t.Skip("confining a VMM needs root")
	}
	rt := testutil.Runtime(t, &qemu.Driver{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	img := filepath.Join(rt.DataDir, "data.ext4")
	if err := volume.Create(ctx, img, 64<<20, ""); err != nil {
		t.Fatal(err)
	}
	inst, err := rt.Boot(ctx, vmrun.Spec{CPUs: 2, MemoryMiB: 300, Mounts: []vmrun.Mount{{Image: img, Path: "/data"}}})
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	defer inst.Destroy(context.Background())
	cg, err := cgroup.Host()
	if err != nil {
		t.Fatal(err)
	}
	name := cgroup.Name(inst.ID)
	want := cgroup.Limits{CPUs: 2, MemoryBytes: (300 + vmrun.DefaultMemoryOverheadMiB) << 20}
	check := func(when string) {
		t.Helper()
		pid := inst.VM.Handle().PID
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		status := map[string][]string{}
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok {
				status[k] = strings.Fields(v)
			}
		}
		for _, key := range []string{"Uid", "Gid"} {
			if ids := status[key]; len(ids) != 4 || slices.Contains(ids, "0") {
				t.Errorf("%s: QEMU %s = %v, want no 0 among them", when, key, ids)
			}
		}
		if s := status["Seccomp"]; len(s) != 1 || s[0] != "2" {
			t.Errorf("%s: QEMU seccomp mode %v, want 2 (filter)", when, s)
		}
		// No network of the host's: a QEMU a guest took over reaches nothing but its TAP.
		vmNet, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
		hostNet, _ := os.Readlink("/proc/self/ns/net")
		if vmNet == "" || vmNet == hostNet {
			t.Errorf("%s: QEMU shares kiln's network namespace (%q)", when, vmNet)
		}
		if g, err := cg.Of(pid); err != nil || g != name {
			t.Errorf("%s: QEMU is in cgroup %q (%v), want %q", when, g, err, name)
		}
		if l, err := cg.Limits(name); err != nil || l != want {
			t.Errorf("%s: cgroup v%d limits %+v (%v), want %+v", when, cg.Version(), l, err, want)
		}
		var out bytes.Buffer
		st, err := inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"sh", "-c", "echo " + when + " >> /data/log && sync && cat /data/log"}}, guest.IO{Stdout: &out})
		if err != nil || st.Code != 0 || !strings.HasSuffix(out.String(), when+"\n") {
			t.Errorf("%s: writing to the volume: %q %+v %v", when, out.String(), st, err)
		}
	}
	check("booted")
	if err := inst.Suspend(ctx); err != nil {
		t.Fatalf("suspend: %v", err)
	}
	if _, err := cg.Limits(name); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the cgroup outlived the suspended VMM: %v", err)
	}
	if err := inst.Resume(ctx); err != nil {
		t.Fatalf("resume: %v", err)
	}
	check("resumed")
	if err := inst.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := cg.Limits(name); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the cgroup outlived the VM: %v", err)
	}
	if uids, err := vmrun.Claims(rt.DataDir); err != nil || len(uids) != 0 {
		t.Errorf("VMM users %v (%v) still claimed after the VM was destroyed", uids, err)
	}
}

// TestCommand: QEMU gets its files as descriptors, runs sandboxed, and names its VM's
// directory (what the reaper looks for).
func TestCommand(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"k", "i", "r", "data"} {
		os.WriteFile(filepath.Join(dir, f), []byte(f), 0o644)
	}
	p := func(f string) string { return filepath.Join(dir, f) }
	cfg := vmm.Config{ID: "x", Dir: dir, CPUs: 2, MemoryMiB: 300, Kernel: p("k"), Initramfs: p("i"),
		Cmdline: "kiln.root=abc", Disks: []vmm.Disk{{Path: p("r"), ReadOnly: true}, {Path: p("data")}}}
	for _, tc := range []struct {
		accel vmm.Accel
		want  []string
	}{
		{vmm.AccelTCG, []string{"-accel tcg", "-cpu max", "tsc_early_khz=2000000", "reboot=t kiln.root=abc"}},
		{vmm.AccelKVM, []string{"-accel kvm", "-cpu host"}},
	} {
		cfg.Accel = tc.accel
		args, files, err := qemu.Command(cfg)
		if err != nil {
			t.Fatal(err)
		}
		got := strings.Join(args, " ")
		// Descriptors from 3: the qmp, agent and console sockets, kernel, initramfs, the
		// read-only disk, then the read-write disk twice (read-only and read-write).
		for _, w := range append(tc.want, "-name "+dir+"/", "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
			"-smp 2", "-m 300M", "-no-reboot", "socket,id=qmp,fd=3,server=on,wait=off", "socket,id=agent,fd=4,server=on,wait=off",
			"socket,id=con,fd=5,server=on,wait=off", "-kernel /proc/self/fd/6", "-initrd /proc/self/fd/7",
			"-add-fd fd=8,set=1", "id=disk0,file=/dev/fdset/1,format=raw,if=none,readonly=on",
			"-add-fd fd=9,set=2", "-add-fd fd=10,set=2", "id=disk1,file=/dev/fdset/2,format=raw,if=none -device") {
			if !strings.Contains(got, w) {
				t.Errorf("%s: args lack %q:\n%s", tc.accel, w, got)
			}
		}
		if strings.Contains(got, p("k")) || strings.Contains(got, p("r")) {
			t.Errorf("QEMU is given a path to open itself:\n%s", got)
		}
		modes := []int{}
		for _, f := range files {
			fl, _ := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
			modes = append(modes, fl&unix.O_ACCMODE)
			f.Close()
		}
		if len(modes) != 8 || modes[5] != unix.O_RDONLY || modes[6] != unix.O_RDONLY || modes[7] != unix.O_RDWR {
			t.Errorf("access modes of the %d files: %v", len(files), modes)
		}
		if fi, err := os.Stat(filepath.Join(dir, "qmp.sock")); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("qmp socket: %v %v, want mode 0600", fi, err)
		}
	}
}
