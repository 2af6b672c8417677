package agent

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/kilnhq/kiln/internal/guest"
)

// OutputCap bounds the output the guest keeps per supervised process; the oldest is
// dropped first.
const OutputCap = 8 << 20

// supervised is a process the guest runs for its whole life regardless of host
// connections, keeping a bounded tail of its output for followers.
type supervised struct {
	mu      sync.Mutex
	records []guest.Record
	base    int64 // offset of records[0]
	end     int64 // offset after the last byte
	size    int64
	dropped bool
	exit    *guest.ExitStatus
	changed chan struct{}
	proc    Proc
}

func (s *supervised) append(stream int, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.records = append(s.records, guest.Record{Offset: s.end, Stream: stream, Time: time.Now().UnixNano(), Data: append([]byte(nil), b...)})
	s.end += int64(len(b))
	s.size += int64(len(b))
	for s.size > OutputCap && len(s.records) > 1 {
		s.size -= int64(len(s.records[0].Data))
		s.records = s.records[1:]
		s.dropped = true
	}
	if len(s.records) > 0 {
		s.base = s.records[0].Offset
	}
	s.notifyLocked()
}

func (s *supervised) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// since returns the records at or after off, whether bytes before were dropped, the
// exit status if the process ended, and a channel that closes on the next change.
func (s *supervised) since(off int64) ([]guest.Record, bool, *guest.ExitStatus, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []guest.Record
	dropped := s.dropped && off < s.base
	for _, r := range s.records {
		if r.Offset+int64(len(r.Data)) <= off {
			continue
		}
		if r.Offset < off {
			skip := off - r.Offset
			r.Data, r.Offset = r.Data[skip:], off
		}
		out = append(out, r)
	}
	return out, dropped, s.exit, s.changed
}

func (a *Agent) spawn(s *yamux.Stream, h guest.Header) {
	req := h.Exec
	if h.ID == "" || req == nil || len(req.Argv) == 0 {
		replyErr(s, guest.CodeInvalid, "spawn: an id and a command are required")
		return
	}
	a.mu.Lock()
	if a.supervised == nil {
		a.supervised = map[string]*supervised{}
	}
	if old := a.supervised[h.ID]; old != nil {
		old.mu.Lock()
		running := old.exit == nil
		old.mu.Unlock()
		if running {
			a.mu.Unlock()
			replyErr(s, guest.CodeInvalid, "spawn: %s is already running", h.ID)
			return
		}
	}
	a.mu.Unlock()
	sup := &supervised{changed: make(chan struct{})}

	if err := writeFiles(req.Files); err != nil {
		replyErr(s, guest.CodeInvalid, "spawn: %v", err)
		return
	}
	cmd, code, err := a.command(req)
	if err != nil {
		replyErr(s, code, "%v", err)
		return
	}
	stdin, _ := os.Open(os.DevNull)
	defer stdin.Close()
	cmd.Stdin = stdin
	var readers []*os.File
	var writers []*os.File
	for range 2 {
		r, w, err := os.Pipe()
		if err != nil {
			replyErr(s, guest.CodeInternal, "spawn: %v", err)
			return
		}
		readers, writers = append(readers, r), append(writers, w)
	}
	cmd.Stdout, cmd.Stderr = writers[0], writers[1]
	proc, err := a.starter.Start(cmd)
	for _, w := range writers {
		w.Close()
	}
	if err != nil {
		for _, r := range readers {
			r.Close()
		}
		replyErr(s, guest.CodeInternal, "spawn %s: %v", req.Argv[0], err)
		return
	}
	sup.proc = proc
	// Registered only once it runs: a spawn that failed must not block the next one.
	a.mu.Lock()
	a.supervised[h.ID] = sup
	a.mu.Unlock()
	reply(s, guest.Reply{PID: proc.Pid()})
	var wg sync.WaitGroup
	for i, r := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer r.Close()
			buf := make([]byte, 32<<10)
			for {
				n, err := r.Read(buf)
				if n > 0 {
					sup.append(i+1, buf[:n])
				}
				if err != nil {
					return
				}
			}
		}()
	}
	go func() {
		ws := <-proc.Done()
		// Output of descendants that outlive the process is not waited for forever.
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
		}
		st := exitStatus(ws, false)
		sup.mu.Lock()
		sup.exit = &st
		sup.notifyLocked()
		sup.mu.Unlock()
	}()
}

func exitStatus(ws syscall.WaitStatus, timedOut bool) guest.ExitStatus {
	st := guest.ExitStatus{Code: ws.ExitStatus(), TimedOut: timedOut}
	if ws.Signaled() {
		st.Signal = int(ws.Signal())
		st.Code = 128 + st.Signal
	}
	return st
}

// follow streams records from h.Offset; with h.Follow it waits for more until the
// process ends and then sends a record carrying the exit status.
func (a *Agent) follow(s *yamux.Stream, h guest.Header) {
	sup := a.lookup(s, h.ID)
	if sup == nil {
		return
	}
	if err := reply(s, guest.Reply{}); err != nil {
		return
	}
	gone := make(chan struct{})
	go func() {
		io.Copy(io.Discard, s) // the host closing its side ends the follow
		close(gone)
	}()
	off := h.Offset
	for {
		recs, dropped, exit, changed := sup.since(off)
		for i, r := range recs {
			if i == 0 && dropped {
				r.Dropped = true
			}
			if err := guest.WriteFrame(s, r); err != nil {
				return
			}
			off = r.Offset + int64(len(r.Data))
		}
		if exit != nil && len(recs) == 0 {
			guest.WriteFrame(s, guest.Record{Offset: off, Exit: exit})
			return
		}
		if !h.Follow && len(recs) == 0 {
			guest.WriteFrame(s, guest.Record{Offset: off, Running: exit == nil})
			return
		}
		if len(recs) > 0 {
			continue
		}
		select {
		case <-changed:
		case <-gone:
			return
		}
	}
}

// command builds the exec.Cmd for req: environment, working directory, user, its own
// session. A failure comes with the code to report it under.
func (a *Agent) command(req *guest.ExecRequest) (*exec.Cmd, guest.ErrCode, error) {
	if req.Dir != "" {
		if fi, err := os.Stat(req.Dir); err != nil || !fi.IsDir() {
			return nil, guest.CodeInvalid, fmt.Errorf("working directory %s does not exist in the guest", req.Dir)
		}
	}
	env := buildEnv(req)
	path, err := lookPath(req.Argv[0], envValue(env, "PATH"))
	if err != nil {
		return nil, guest.CodeNotFound, fmt.Errorf("%s: command not found in the guest", req.Argv[0])
	}
	cmd := &exec.Cmd{Path: path, Args: req.Argv, Env: env, Dir: req.Dir}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if req.UID != 0 || req.GID != 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: req.UID, Gid: req.GID}
	}
	return cmd, "", nil
}

// signal delivers a signal to a supervised process that is still running.
func (a *Agent) signal(s *yamux.Stream, h guest.Header) {
	sup := a.lookup(s, h.ID)
	if sup == nil {
		return
	}
	if h.Signal <= 0 || h.Signal > 64 {
		replyErr(s, guest.CodeInvalid, "signal %d is not a signal number", h.Signal)
		return
	}
	sup.mu.Lock()
	done := sup.exit != nil
	sup.mu.Unlock()
	if done {
		replyErr(s, guest.CodeInvalid, "%s has already exited", h.ID)
		return
	}
	if err := sup.proc.Signal(syscall.Signal(h.Signal)); err != nil {
		replyErr(s, guest.CodeInternal, "signal: %v", err)
		return
	}
	reply(s, guest.Reply{})
}

// lookup finds supervised process id, or answers that there is none.
func (a *Agent) lookup(s *yamux.Stream, id string) *supervised {
	a.mu.Lock()
	sup := a.supervised[id]
	a.mu.Unlock()
	if sup == nil {
		replyErr(s, guest.CodeNotFound, "no supervised process %q", id)
	}
	return sup
}

// writeFiles writes a workload's files: each replaces what its path held (a symlink
// there is replaced, not followed), in directories made as needed.
func writeFiles(files []guest.File) error {
	for _, f := range files {
		if !filepath.IsAbs(f.Path) || filepath.Clean(f.Path) != f.Path {
			return fmt.Errorf("file %q: not an absolute, clean path", f.Path)
		}
		if err := os.MkdirAll(filepath.Dir(f.Path), 0o755); err != nil {
			return fmt.Errorf("file %s: %w", f.Path, err)
		}
		tmp := f.Path + ".kiln-new"
		os.Remove(tmp)
		fd, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return fmt.Errorf("file %s: %w", f.Path, err)
		}
		_, err = fd.Write(f.Data)
		if cerr := fd.Close(); err == nil {
			err = cerr
		}
		mode := os.FileMode(f.Mode & 0o7777)
		if mode == 0 {
			mode = 0o644
		}
		if err == nil {
			err = os.Chmod(tmp, mode)
		}
		if err == nil {
			err = os.Rename(tmp, f.Path)
		}
		if err != nil {
			os.Remove(tmp)
			return fmt.Errorf("file %s: %w", f.Path, err)
		}
	}
	return nil
}
