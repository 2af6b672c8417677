package vmm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/cgroup"
)

// Process is a running VMM process as every driver sees it: who it is and when it is
// gone. It works the same for a process this kiln started and one it re-attached to.
type Process struct {
	PID   int
	Start uint64
	done  <-chan struct{}
}

// StartProcess starts cmd as c's user, inside c's cgroup, and reaps it when it exits.
func StartProcess(cmd *exec.Cmd, c Confine) (*Process, error) {
	if c.UID != 0 || c.GID != 0 {
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: c.UID, Gid: c.GID, Groups: c.Groups}
	}
	start := cmd.Start
	if c.Cgroup != "" {
		cg, err := cgroup.Host()
		if err != nil {
			return nil, err
		}
		start = func() error { return cg.Start(c.Cgroup, cmd) }
	}
	if err := start(); err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	return &Process{PID: cmd.Process.Pid, Start: ProcStart(cmd.Process.Pid), done: done}, nil
}

// AttachProcess follows a VMM started by another kiln process.
func AttachProcess(pid int, start uint64) *Process {
	return &Process{PID: pid, Start: start, done: WatchExit(pid, start)}
}

// Exited is closed once the process is gone.
func (p *Process) Exited() <-chan struct{} { return p.done }

// IsExited reports whether the process is gone.
func (p *Process) IsExited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Kill sends SIGKILL and waits until the process is gone.
func (p *Process) Kill(ctx context.Context) error {
	if err := KillAndWait(p.PID, p.Start, 10*time.Second); err != nil {
		return err
	}
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Stop asks the guest to power off with request, waits up to grace for the process to
// end, and kills it otherwise.
func (p *Process) Stop(ctx context.Context, grace time.Duration, request func(context.Context) error) error {
	if p.IsExited() {
		return nil
	}
	if err := request(ctx); err == nil {
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case <-p.done:
			return nil
		case <-t.C:
		case <-ctx.Done():
		}
	}
	return p.Kill(context.WithoutCancel(ctx))
}

// LogTail returns the end of a VMM's log, prefixed with a newline, for error messages;
// a VMM that fails must not fail without its log.
func LogTail(path string) string {
	s := strings.TrimSpace(string(fileTail(path, 1500)))
	if s == "" {
		return ""
	}
	return "\n" + s
}

// RemoveFiles removes the named files from dir, ignoring those already gone.
func RemoveFiles(dir string, names ...string) error {
	var first error
	for _, n := range names {
		if err := os.Remove(dir + "/" + n); err != nil && !os.IsNotExist(err) && first == nil {
			first = err
		}
	}
	return first
}

// ProcStart returns a process's start time in clock ticks since boot, or 0 if it is gone.
func ProcStart(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces and parentheses; fields after the last
	// ')' are plain.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0
	}
	v, _ := strconv.ParseUint(f[19], 10, 64)
	return v
}

// Alive reports whether the process pid with start time start still exists (zombies
// count as gone).
func Alive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := strings.LastIndexByte(string(b), ')'); i > 0 && len(b) > i+2 && b[i+2] == 'Z' {
		return false
	}
	return start == 0 || ProcStart(pid) == start
}

// WatchExit returns a channel closed when the process is gone. It works for processes
// that are not our children (a recovered VM), using a pidfd where the kernel has one.
func WatchExit(pid int, start uint64) <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		defer close(ch)
		if fd, err := unix.PidfdOpen(pid, 0); err == nil {
			defer unix.Close(fd)
			if Alive(pid, start) {
				fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
				for {
					n, err := unix.Poll(fds, -1)
					if err == unix.EINTR {
						continue
					}
					if n > 0 || err != nil {
						break
					}
				}
			}
			return
		}
		for Alive(pid, start) {
			time.Sleep(50 * time.Millisecond)
		}
	}()
	return ch
}

// KillAndWait SIGKILLs the process if it is still the one named and waits up to timeout
// for it to go.
func KillAndWait(pid int, start uint64, timeout time.Duration) error {
	if !Alive(pid, start) {
		return nil
	}
	unix.Kill(pid, unix.SIGKILL)
	deadline := time.Now().Add(timeout)
	for Alive(pid, start) {
		if time.Now().After(deadline) {
			return fmt.Errorf("process %d did not exit within %s of SIGKILL", pid, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}
