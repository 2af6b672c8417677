package agent

import (
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Proc is a started process.
type Proc interface {
	Pid() int
	Signal(syscall.Signal) error
	// KillGroup kills the process's whole process group (its session, since every exec
	// gets its own).
	KillGroup()
	Kill()
	// Done delivers the wait status once.
	Done() <-chan syscall.WaitStatus
}

// Starter starts processes. PID 1 must reap every orphan in the VM, which would steal
// exit statuses from os/exec's Wait, so it uses a Reaper; elsewhere ExecStarter is fine.
type Starter interface {
	Start(cmd *exec.Cmd) (Proc, error)
}

type proc struct {
	pid  int
	done chan syscall.WaitStatus
}

func (p *proc) Pid() int                        { return p.pid }
func (p *proc) Signal(s syscall.Signal) error   { return unix.Kill(p.pid, s) }
func (p *proc) KillGroup()                      { unix.Kill(-p.pid, unix.SIGKILL) }
func (p *proc) Kill()                           { unix.Kill(p.pid, unix.SIGKILL) }
func (p *proc) Done() <-chan syscall.WaitStatus { return p.done }

// ExecStarter waits for each process with os/exec. For tests and non-init use.
type ExecStarter struct{}

func (ExecStarter) Start(cmd *exec.Cmd) (Proc, error) {
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &proc{pid: cmd.Process.Pid, done: make(chan syscall.WaitStatus, 1)}
	go func() {
		cmd.Wait()
		p.done <- cmd.ProcessState.Sys().(syscall.WaitStatus)
	}()
	return p, nil
}

// Reaper is PID 1's process table: it reaps every child that exits, hands the status to
// the exec that started it, and drops the statuses of orphans re-parented to init.
type Reaper struct {
	mu    sync.Mutex
	procs map[int]*proc
}

// NewReaper starts reaping. Call once, in PID 1.
func NewReaper() *Reaper {
	r := &Reaper{procs: map[int]*proc{}}
	ch := make(chan os.Signal, 16)
	signal.Notify(ch, unix.SIGCHLD)
	go func() {
		for range ch {
			r.reap()
		}
	}()
	return r
}

func (r *Reaper) reap() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
		// Start holds mu from fork until the pid is registered, so a child that exits at
		// once is still found here.
		r.mu.Lock()
		p := r.procs[pid]
		delete(r.procs, pid)
		r.mu.Unlock()
		if p != nil {
			p.done <- syscall.WaitStatus(ws)
		}
	}
}

func (r *Reaper) Start(cmd *exec.Cmd) (Proc, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &proc{pid: cmd.Process.Pid, done: make(chan syscall.WaitStatus, 1)}
	r.procs[p.pid] = p
	// The status comes from wait4 above; drop os.Process's pidfd now.
	cmd.Process.Release()
	return p, nil
}
