package vmm

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

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
