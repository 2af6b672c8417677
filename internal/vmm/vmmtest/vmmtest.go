// Package vmmtest is the conformance suite every vmm.Driver runs: real guests, real
// disks, the agent protocol end to end. A driver's test calls Run with a factory that
// returns a runtime using that driver (see testutil.Runtime).
package vmmtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmrun"
	"github.com/kilnhq/kiln/internal/volume"
)

// Factory returns a runtime whose VM state is private to the test and checked for
// leftovers when the test ends.
type Factory func(t *testing.T) *vmrun.Runtime

// Options tune the suite for a driver.
type Options struct {
	// Boots is how many VMs the boot-loop test starts in a row.
	Boots int
}

func boot(t *testing.T, rt *vmrun.Runtime, spec vmrun.Spec) *vmrun.Instance {
	t.Helper()
	if spec.CPUs == 0 {
		spec.CPUs = 1
	}
	if spec.MemoryMiB == 0 {
		spec.MemoryMiB = 256
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	inst, err := rt.Boot(ctx, spec)
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	t.Cleanup(func() { inst.Destroy(context.Background()) })
	return inst
}

// run executes argv and returns stdout, stderr and the status.
func run(t *testing.T, inst *vmrun.Instance, req guest.ExecRequest, stdin io.Reader) (string, string, guest.ExitStatus) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, errb bytes.Buffer
	st, err := inst.Agent.Exec(ctx, req, guest.IO{Stdin: stdin, Stdout: &out, Stderr: &errb})
	if err != nil {
		t.Fatalf("exec %v: %v", req.Argv, err)
	}
	return out.String(), errb.String(), st
}

func sh(script string) guest.ExecRequest {
	return guest.ExecRequest{Argv: []string{"sh", "-c", script}}
}

// Run runs the suite.
func Run(t *testing.T, newRuntime Factory, o Options) {
	if o.Boots == 0 {
		o.Boots = 10
	}

	t.Run("ExecBasics", func(t *testing.T) {
		rt := newRuntime(t)
		inst := boot(t, rt, vmrun.Spec{})
		if inst.Agent.Hello.Kernel == "" {
			t.Error("hello reply names no guest kernel")
		}
		info, err := inst.VM.Inspect(context.Background())
		if err != nil || info.State != vmm.StateRunning {
			t.Errorf("Inspect = %+v, %v; want running", info, err)
		}

		t.Run("ExitCode", func(t *testing.T) {
			out, _, st := run(t, inst, sh("echo hello from $(uname -r); exit 3"), nil)
			if st.Code != 3 || st.Signal != 0 {
				t.Errorf("status = %+v, want exit code 3", st)
			}
			if !strings.HasPrefix(out, "hello from ") {
				t.Errorf("stdout = %q", out)
			}
		})
		t.Run("StdoutStderrSeparate", func(t *testing.T) {
			out, errs, _ := run(t, inst, sh("echo out; echo err >&2"), nil)
			if out != "out\n" || errs != "err\n" {
				t.Errorf("stdout %q stderr %q", out, errs)
			}
		})
		t.Run("Signal", func(t *testing.T) {
			_, _, st := run(t, inst, sh("kill -KILL $$"), nil)
			if st.Signal != int(syscall.SIGKILL) || st.Code != 137 {
				t.Errorf("status = %+v, want killed by SIGKILL (137)", st)
			}
		})
		t.Run("SignalDelivery", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			var out bytes.Buffer
			p, err := inst.Agent.Start(ctx, sh("trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done"), guest.IO{Stdout: &out})
			if err != nil {
				t.Fatal(err)
			}
			// Wait for the trap to be installed before signalling.
			for !strings.Contains(out.String(), "ready") && ctx.Err() == nil {
				time.Sleep(20 * time.Millisecond)
			}
			if err := p.Signal(int(syscall.SIGTERM)); err != nil {
				t.Fatal(err)
			}
			st, err := p.Wait(ctx)
			if err != nil || st.Code != 42 {
				t.Errorf("status = %+v, %v; want 42 from the TERM trap", st, err)
			}
		})
		t.Run("Stdin", func(t *testing.T) {
			out, _, st := run(t, inst, guest.ExecRequest{Argv: []string{"sha256sum"}}, strings.NewReader(strings.Repeat("kiln\n", 100000)))
			want := fmt.Sprintf("%x", sha256.Sum256([]byte(strings.Repeat("kiln\n", 100000))))
			if st.Code != 0 || !strings.HasPrefix(out, want) {
				t.Errorf("sha256 of stdin in guest = %q (%+v), want %s", out, st, want)
			}
		})
		t.Run("EnvCwdUser", func(t *testing.T) {
			req := sh("echo $KILN_X $(pwd) $(id -u):$(id -g)")
			req.Env, req.Dir, req.UID, req.GID = []string{"KILN_X=yes"}, "/tmp", 1000, 1000
			out, _, _ := run(t, inst, req, nil)
			if out != "yes /tmp 1000:1000\n" {
				t.Errorf("got %q", out)
			}
		})
		t.Run("CommandNotFound", func(t *testing.T) {
			_, err := inst.Agent.Exec(context.Background(), guest.ExecRequest{Argv: []string{"kiln-no-such-command"}}, guest.IO{})
			if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "kiln-no-such-command") {
				t.Errorf("err = %v, want not found naming the command", err)
			}
		})
		t.Run("Timeout", func(t *testing.T) {
			req := sh("sleep 30")
			req.TimeoutMS = 300
			_, _, st := run(t, inst, req, nil)
			if !st.TimedOut || st.Signal != int(syscall.SIGKILL) {
				t.Errorf("status = %+v, want timed out", st)
			}
		})
		t.Run("TTY", func(t *testing.T) {
			req := sh("test -t 0 && test -t 1 && stty size")
			req.TTY, req.Rows, req.Cols = true, 33, 101
			out, _, st := run(t, inst, req, nil)
			if st.Code != 0 || strings.TrimSpace(out) != "33 101" {
				t.Errorf("tty exec: %q %+v", out, st)
			}
		})
		t.Run("Files", func(t *testing.T) {
			ctx := context.Background()
			data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
			if err := inst.Agent.WriteFile(ctx, "/tmp/x/data.bin", 0o600, bytes.NewReader(data)); err != nil {
				t.Fatal(err)
			}
			var back bytes.Buffer
			if _, err := inst.Agent.ReadFile(ctx, "/tmp/x/data.bin", &back); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(back.Bytes(), data) {
				t.Errorf("read back %d bytes, differ from the %d written", back.Len(), len(data))
			}
			out, _, _ := run(t, inst, sh("stat -c %a /tmp/x/data.bin"), nil)
			if out != "600\n" {
				t.Errorf("mode = %q, want 600", out)
			}
			if _, err := inst.Agent.ReadFile(ctx, "/nonexistent", io.Discard); !errors.Is(err, errdefs.ErrNotFound) {
				t.Errorf("reading a missing file: %v, want not found", err)
			}
			if err := inst.Agent.Sync(ctx); err != nil {
				t.Error(err)
			}
		})
		t.Run("LargeStdout", func(t *testing.T) {
			// 100 MiB of non-repeating bytes, hashed on both sides.
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			h := sha256.New()
			var errb bytes.Buffer
			st, err := inst.Agent.Exec(ctx, sh("mkfifo /tmp/f && (sha256sum < /tmp/f >&2 &) && head -c 104857600 /dev/urandom | tee /tmp/f; wait"), guest.IO{Stdout: h, Stderr: &errb})
			if err != nil || st.Code != 0 {
				t.Fatalf("exec: %v %+v %s", err, st, errb.String())
			}
			got := fmt.Sprintf("%x", h.Sum(nil))
			if want := strings.Fields(errb.String())[0]; got != want {
				t.Errorf("host sha256 %s != guest sha256 %s", got, want)
			}
		})
		t.Run("ConcurrentExecs", func(t *testing.T) {
			var wg sync.WaitGroup
			outs := make([]string, 4)
			errs := make([]error, 4)
			for i := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					var out bytes.Buffer
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					defer cancel()
					// Each sleeps so that all four are running at once.
					_, errs[i] = inst.Agent.Exec(ctx, sh(fmt.Sprintf("sleep 1; seq 1 20000 | sed 's/^/%d-/'", i)), guest.IO{Stdout: &out})
					outs[i] = out.String()
				}()
			}
			wg.Wait()
			for i := range 4 {
				if errs[i] != nil {
					t.Errorf("exec %d: %v", i, errs[i])
					continue
				}
				lines := strings.Split(strings.TrimSpace(outs[i]), "\n")
				if len(lines) != 20000 || lines[0] != fmt.Sprintf("%d-1", i) || lines[19999] != fmt.Sprintf("%d-20000", i) {
					t.Errorf("exec %d: %d lines, first %q", i, len(lines), lines[0])
				}
			}
		})
	})

	t.Run("DiskPersistsAcrossVMs", func(t *testing.T) {
		rt := newRuntime(t)
		img := filepath.Join(rt.DataDir, "data.ext4")
		if err := volume.Create(context.Background(), img, 64<<20, ""); err != nil {
			t.Fatal(err)
		}
		inst := boot(t, rt, vmrun.Spec{Mounts: []vmrun.Mount{{Image: img, Path: "/data"}}})
		if _, _, st := run(t, inst, sh("head -c 4194304 /dev/urandom > /data/blob && sha256sum /data/blob > /data/blob.sum"), nil); st.Code != 0 {
			t.Fatalf("write: %+v", st)
		}

		// While attached, a second VM must be refused, naming the holder.
		_, err := rt.Boot(context.Background(), vmrun.Spec{CPUs: 1, MemoryMiB: 256, Mounts: []vmrun.Mount{{Image: img, Path: "/data"}}})
		if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), inst.ID) {
			t.Errorf("second attach: %v; want a conflict naming VM %s", err, inst.ID)
		}

		if err := inst.Shutdown(context.Background(), 20*time.Second); err != nil {
			t.Fatalf("shutdown: %v", err)
		}
		inst2 := boot(t, rt, vmrun.Spec{Mounts: []vmrun.Mount{{Image: img, Path: "/data"}}})
		out, errs, st := run(t, inst2, sh("cd /data && sha256sum -c blob.sum"), nil)
		if st.Code != 0 {
			t.Errorf("data written by the first VM does not verify in the second: %s %s", out, errs)
		}
	})

	t.Run("VMMKilledMidExec", func(t *testing.T) {
		rt := newRuntime(t)
		inst := boot(t, rt, vmrun.Spec{})
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		p, err := inst.Agent.Start(ctx, sh("sleep 600"), guest.IO{})
		if err != nil {
			t.Fatal(err)
		}
		if err := inst.VM.Kill(ctx); err != nil {
			t.Fatal(err)
		}
		_, err = p.Wait(ctx)
		if ctx.Err() != nil {
			t.Fatal("Wait hung after the VMM was killed")
		}
		if !errors.Is(err, errdefs.ErrUnavailable) {
			t.Errorf("err = %v, want unavailable", err)
		}
		info, _ := inst.VM.Inspect(ctx)
		if info.State != vmm.StateExited {
			t.Errorf("state after kill = %s", info.State)
		}
	})

	t.Run("StopIsGraceful", func(t *testing.T) {
		rt := newRuntime(t)
		inst := boot(t, rt, vmrun.Spec{})
		start := time.Now()
		grace := 30 * time.Second
		if err := inst.VM.Stop(context.Background(), grace); err != nil {
			t.Fatal(err)
		}
		// The guest powered itself off; it was not killed at the end of the grace period.
		if d := time.Since(start); d >= grace {
			t.Errorf("Stop took %s: the guest ignored the stop request", d)
		}
		select {
		case <-inst.VM.Wait():
		default:
			t.Error("VMM still running after Stop returned")
		}
	})

	t.Run("PauseResume", func(t *testing.T) {
		rt := newRuntime(t)
		inst := boot(t, rt, vmrun.Spec{})
		s, ok := inst.VM.(vmm.Snapshotter)
		if !ok {
			t.Fatalf("%s VM does not implement Pause/Resume", rt.Driver.Name())
		}
		ctx := context.Background()
		if err := s.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		if info, _ := inst.VM.Inspect(ctx); info.State != vmm.StatePaused {
			t.Errorf("state after pause = %s", info.State)
		}
		if err := s.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		if _, _, st := run(t, inst, sh("true"), nil); st.Code != 0 {
			t.Errorf("exec after resume: %+v", st)
		}
	})

	t.Run("SuspendResume", func(t *testing.T) {
		rt := newRuntime(t)
		if !rt.Driver.Capabilities().Snapshot {
			t.Skipf("the %s driver declares no snapshots", rt.Driver.Name())
		}
		inst := boot(t, rt, vmrun.Spec{})
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		// State that only lives in guest memory: a tmpfs file and a running process.
		run(t, inst, sh("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /tmp/token"), nil)
		if _, err := inst.Agent.Spawn(ctx, "counter", sh("i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done")); err != nil {
			t.Fatal(err)
		}
		token, _, _ := run(t, inst, sh("cat /tmp/token /proc/sys/kernel/random/boot_id"), nil)
		if err := inst.Suspend(ctx); err != nil {
			t.Fatalf("suspend: %v", err)
		}
		select {
		case <-inst.VM.Wait():
		default:
			t.Error("the VMM still runs after suspend")
		}
		time.Sleep(3 * time.Second) // let the guest's clock fall behind while it is saved
		if err := inst.Resume(ctx); err != nil {
			t.Fatalf("resume: %v", err)
		}
		again, _, _ := run(t, inst, sh("cat /tmp/token /proc/sys/kernel/random/boot_id"), nil)
		if again != token {
			t.Errorf("after resume the guest has %q, before it had %q: not the same VM (a cold boot?)", again, token)
		}
		c1, _, _ := run(t, inst, sh("cat /tmp/count; sleep 0.5"), nil)
		c2, _, _ := run(t, inst, sh("cat /tmp/count"), nil)
		if strings.TrimSpace(c1) == strings.TrimSpace(c2) {
			t.Errorf("the process running before the suspend does not run after it (count %s)", c1)
		}
		out, _, _ := run(t, inst, sh("date +%s"), nil)
		var guestNow int64
		fmt.Sscan(out, &guestNow)
		if d := time.Now().Unix() - guestNow; d > 2 || d < -2 {
			t.Errorf("the guest clock is %d s off after resume", d)
		}
		if _, err := os.Stat(inst.SnapshotDir()); !os.IsNotExist(err) {
			t.Error("the snapshot was not discarded after resume")
		}
	})

	t.Run("Recover", func(t *testing.T) {
		rt := newRuntime(t)
		inst := boot(t, rt, vmrun.Spec{})
		// A new kiln process knows only the persisted handle.
		inst.Agent.Close()
		if err := inst.VM.Detach(); err != nil {
			t.Fatal(err)
		}
		vm, err := rt.Driver.Recover(context.Background(), inst.VM.Handle())
		if err != nil {
			t.Fatalf("recover: %v", err)
		}
		info, err := vm.Inspect(context.Background())
		if err != nil || info.State != vmm.StateRunning {
			t.Fatalf("recovered VM: %+v %v", info, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c, err := guest.Dial(ctx, vm.DialAgent)
		if err != nil {
			t.Fatalf("agent after recover: %v", err)
		}
		var out bytes.Buffer
		if st, err := c.Exec(ctx, sh("echo again"), guest.IO{Stdout: &out}); err != nil || out.String() != "again\n" {
			t.Errorf("exec after recover: %q %+v %v", out.String(), st, err)
		}
		c.Close()
		inst.VM = vm
	})

	t.Run("BootLoop", func(t *testing.T) {
		rt := newRuntime(t)
		for i := range o.Boots {
			inst := boot(t, rt, vmrun.Spec{})
			out, _, st := run(t, inst, sh("cat /proc/sys/kernel/random/boot_id"), nil)
			if st.Code != 0 || len(strings.TrimSpace(out)) != 36 {
				t.Fatalf("boot %d: %q %+v", i, out, st)
			}
			if err := inst.Shutdown(context.Background(), 20*time.Second); err != nil {
				t.Fatalf("boot %d shutdown: %v", i, err)
			}
			t.Logf("boot %d: ready in %s", i, inst.Timing.Total.Round(time.Millisecond))
		}
	})

	t.Run("BadInput", func(t *testing.T) {
		rt := newRuntime(t)
		ctx := context.Background()
		notExt4 := filepath.Join(rt.DataDir, "not-ext4.img")
		os.WriteFile(notExt4, make([]byte, 1<<20), 0o644)
		for _, tc := range []struct {
			name string
			spec vmrun.Spec
			want string
		}{
			{"TooMuchMemory", vmrun.Spec{CPUs: 1, MemoryMiB: 1 << 30}, "memory="},
			{"TooLittleMemory", vmrun.Spec{CPUs: 1, MemoryMiB: 16}, "memory="},
			{"ZeroCPUs", vmrun.Spec{CPUs: 0, MemoryMiB: 256}, "cpus="},
			{"TooManyCPUs", vmrun.Spec{CPUs: 4096, MemoryMiB: 256}, "cpus="},
			{"NotExt4", vmrun.Spec{CPUs: 1, MemoryMiB: 256, Mounts: []vmrun.Mount{{Image: notExt4, Path: "/data"}}}, "not an ext4 image"},
			{"RelativeMountPoint", vmrun.Spec{CPUs: 1, MemoryMiB: 256, Mounts: []vmrun.Mount{{Image: notExt4, Path: "data"}}}, "absolute path"},
			{"MissingDisk", vmrun.Spec{CPUs: 1, MemoryMiB: 256, Mounts: []vmrun.Mount{{Image: "/nonexistent.ext4", Path: "/data"}}}, "does not exist"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				_, err := rt.Boot(ctx, tc.spec)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Errorf("err = %v, want one mentioning %q", err, tc.want)
				}
			})
		}
	})
}
