// Package agent is the guest side of kiln's agent protocol (see package guest). It is
// linked into kiln-init, the guest's PID 1, and into unit tests that run it on the host
// over an in-memory pipe.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/creack/pty"
	"github.com/hashicorp/yamux"
	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/reqid"
)

// DefaultPath is the PATH a process gets unless the request sets one.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// streamWait bounds how long an exec waits for its data streams to arrive.
const streamWait = 30 * time.Second

// Agent serves agent requests. The zero value is not usable; use New.
type Agent struct {
	starter Starter
	// PowerOff is called after a poweroff request was acknowledged. kiln-init turns the
	// VM off; tests record the call.
	PowerOff func()
	// Info fills the hello reply's guest description.
	Info func(*guest.Reply)
	// SetTime sets the wall clock (kiln-init); nil refuses.
	SetTime func(unixNano int64) error
	// Log, if set, takes one line per exec, spawn and signal, with the request id of
	// the API call it serves (kiln-init: the console, which the host keeps).
	Log func(format string, args ...any)
	// Mounts are the filesystems a stats request reports (statfs each): kiln-init's root
	// and volume mounts. Nil reports "/".
	Mounts []string

	mu         sync.Mutex
	pending    map[string]*execStreams
	supervised map[string]*supervised
}

type execStreams struct {
	stdin, stdout, stderr net.Conn
	changed               chan struct{}
}

// New returns an Agent that starts processes with s.
func New(s Starter) *Agent {
	return &Agent{starter: s, pending: map[string]*execStreams{}, PowerOff: func() {}}
}

// Serve runs one agent session on conn until the peer goes away or ctx ends.
func (a *Agent) Serve(ctx context.Context, conn io.ReadWriteCloser) error {
	sess, err := yamux.Server(conn, guest.SessionConfig())
	if err != nil {
		conn.Close()
		return err
	}
	defer sess.Close()
	stop := context.AfterFunc(ctx, func() { sess.Close() })
	defer stop()
	for {
		s, err := sess.AcceptStream()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, io.EOF) || sess.IsClosed() {
				return nil
			}
			return err
		}
		go a.handle(s)
	}
}

func reply(w io.Writer, r guest.Reply) error { return guest.WriteFrame(w, r) }

func replyErr(w io.Writer, code guest.ErrCode, format string, args ...any) {
	reply(w, guest.Reply{Code: code, Error: fmt.Sprintf(format, args...)})
}

func (a *Agent) handle(s *yamux.Stream) {
	var h guest.Header
	if err := guest.ReadFrame(s, &h); err != nil {
		s.Close()
		return
	}
	if h.Version != guest.Version {
		replyErr(s, guest.CodeVersion,
			"host speaks agent protocol v%d, this guest agent speaks v%d: rebuild the guest assets with `make setup`", h.Version, guest.Version)
		s.Close()
		return
	}
	if a.Log != nil {
		if line := logLine(h); line != "" {
			a.Log("%s", line)
		}
	}
	switch h.Op {
	case guest.OpStdin, guest.OpStdout, guest.OpStderr:
		// Data streams stay open; the exec that names their token owns and closes them.
		a.attach(h.Token, h.Op, s)
		return
	}
	defer s.Close()
	switch h.Op {
	case guest.OpHello:
		r := guest.Reply{Version: guest.Version, Ops: guest.AddedOps}
		if a.Info != nil {
			a.Info(&r)
		}
		reply(s, r)
	case guest.OpExec:
		a.exec(s, h)
	case guest.OpSpawn:
		a.spawn(s, h)
	case guest.OpFollow:
		a.follow(s, h)
	case guest.OpSignal:
		a.signal(s, h)
	case guest.OpSetTime:
		if a.SetTime == nil {
			replyErr(s, guest.CodeInvalid, "this agent does not set the clock")
			return
		}
		if err := a.SetTime(h.Time); err != nil {
			replyErr(s, guest.CodeInternal, "setting the clock: %v", err)
			return
		}
		reply(s, guest.Reply{})
	case guest.OpConnect:
		connect(s, h.Path)
	case guest.OpPs:
		ps(s, "/proc")
	case guest.OpStats:
		mounts := a.Mounts
		if mounts == nil {
			mounts = []string{"/"}
		}
		stats(s, "/proc", mounts)
	case guest.OpReadFile:
		readFile(s, h.Path)
	case guest.OpWriteFile:
		writeFile(s, h.Path, h.Mode)
	case guest.OpSync:
		unix.Sync()
		reply(s, guest.Reply{})
	case guest.OpPowerOff:
		unix.Sync()
		reply(s, guest.Reply{})
		a.PowerOff()
	default:
		replyErr(s, guest.CodeInvalid, "unknown agent operation %q", h.Op)
	}
}

func (a *Agent) attach(token string, op guest.Op, s net.Conn) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.pending[token]
	if e == nil {
		e = &execStreams{changed: make(chan struct{})}
		a.pending[token] = e
		// A token whose exec never arrives must not pin its streams forever.
		time.AfterFunc(streamWait, func() {
			if e := a.take(token); e != nil {
				e.close()
			}
		})
	}
	switch op {
	case guest.OpStdin:
		e.stdin = s
	case guest.OpStdout:
		e.stdout = s
	case guest.OpStderr:
		e.stderr = s
	}
	close(e.changed)
	e.changed = make(chan struct{})
}

// take removes and returns the streams for token; those not asked for are closed by the
// caller.
func (a *Agent) take(token string) *execStreams {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.pending[token]
	delete(a.pending, token)
	return e
}

// awaitStreams waits until every stream req needs has arrived.
func (a *Agent) awaitStreams(token string, req *guest.ExecRequest) (*execStreams, error) {
	deadline := time.After(streamWait)
	for {
		a.mu.Lock()
		e := a.pending[token]
		if e == nil {
			e = &execStreams{changed: make(chan struct{})}
			a.pending[token] = e
		}
		ready := e.stdout != nil && (req.TTY || e.stderr != nil) && (!req.Stdin || e.stdin != nil)
		ch := e.changed
		a.mu.Unlock()
		if ready {
			return a.take(token), nil
		}
		select {
		case <-ch:
		case <-deadline:
			if e := a.take(token); e != nil {
				e.close()
			}
			return nil, fmt.Errorf("exec streams did not arrive within %s", streamWait)
		}
	}
}

func (e *execStreams) close() {
	for _, c := range []net.Conn{e.stdin, e.stdout, e.stderr} {
		if c != nil {
			c.Close()
		}
	}
}

// lookPath resolves argv0 against the request's PATH, not the agent's.
func lookPath(argv0, path string) (string, error) {
	if strings.Contains(argv0, "/") {
		if _, err := os.Stat(argv0); err != nil {
			return "", err
		}
		return argv0, nil
	}
	for _, dir := range filepath.SplitList(path) {
		p := filepath.Join(dir, argv0)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fs.ErrNotExist
}

func buildEnv(req *guest.ExecRequest) []string {
	env := []string{"PATH=" + DefaultPath, "HOME=/root"}
	if req.TTY {
		env = append(env, "TERM=xterm")
	}
	// Later entries win, as with execve's callers generally.
	seen := map[string]int{}
	for i, kv := range env {
		seen[strings.SplitN(kv, "=", 2)[0]] = i
	}
	for _, kv := range req.Env {
		k := strings.SplitN(kv, "=", 2)[0]
		if i, ok := seen[k]; ok {
			env[i] = kv
			continue
		}
		seen[k] = len(env)
		env = append(env, kv)
	}
	return env
}

func envValue(env []string, key string) string {
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, key+"="); ok {
			return v
		}
	}
	return ""
}

// logLine says what a request that starts or signals a process does, in one bounded
// line ending with the request id of the API call it serves; "" for the rest.
func logLine(h guest.Header) string {
	var line string
	switch {
	case h.Op == guest.OpExec && h.Exec != nil && len(h.Exec.Argv) > 0:
		line = fmt.Sprintf("exec %q", clip(h.Exec.Argv[0])) // not its arguments: they may hold secrets
	case h.Op == guest.OpSpawn && h.Exec != nil && len(h.Exec.Argv) > 0:
		line = fmt.Sprintf("spawn %q as %q", clip(h.Exec.Argv[0]), clip(h.ID))
	case h.Op == guest.OpSignal:
		line = fmt.Sprintf("signal %d to %q", h.Signal, clip(h.ID))
	default:
		return ""
	}
	if reqid.Valid(h.RequestID) { // the host sends only valid ones; the console stays one line each
		line += " request_id=" + h.RequestID
	}
	return line
}

// clip bounds a name a log line quotes.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

func (a *Agent) exec(ctl *yamux.Stream, h guest.Header) {
	req := h.Exec
	if req == nil || len(req.Argv) == 0 {
		replyErr(ctl, guest.CodeInvalid, "exec: no command given")
		return
	}
	streams, err := a.awaitStreams(h.Token, req)
	if err != nil {
		replyErr(ctl, guest.CodeInternal, "exec: %v", err)
		return
	}
	defer streams.close()

	cmd, code, err := a.command(req)
	if err != nil {
		replyErr(ctl, code, "%v", err)
		return
	}

	// Wire the process to pipes (or a pty) so that no os/exec goroutine sits between the
	// process and the stream: our own copies below own backpressure and shutdown.
	var (
		closeAfterStart []*os.File
		outputs         []struct {
			r *os.File
			w net.Conn
		}
		stdinW *os.File
		ptmx   *os.File
	)
	cleanup := func() {
		for _, f := range closeAfterStart {
			f.Close()
		}
	}
	if req.TTY {
		m, tty, err := pty.Open()
		if err != nil {
			replyErr(ctl, guest.CodeInternal, "exec: opening a pty: %v", err)
			return
		}
		if req.Rows > 0 && req.Cols > 0 {
			pty.Setsize(m, &pty.Winsize{Rows: req.Rows, Cols: req.Cols})
		}
		ptmx = m
		cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
		cmd.SysProcAttr.Setctty = true
		closeAfterStart = append(closeAfterStart, tty)
		outputs = append(outputs, struct {
			r *os.File
			w net.Conn
		}{m, streams.stdout})
		if req.Stdin {
			stdinW = m
		}
	} else {
		for _, w := range []net.Conn{streams.stdout, streams.stderr} {
			pr, pw, err := os.Pipe()
			if err != nil {
				cleanup()
				replyErr(ctl, guest.CodeInternal, "exec: %v", err)
				return
			}
			closeAfterStart = append(closeAfterStart, pw)
			outputs = append(outputs, struct {
				r *os.File
				w net.Conn
			}{pr, w})
		}
		cmd.Stdout, cmd.Stderr = closeAfterStart[0], closeAfterStart[1]
		if req.Stdin {
			pr, pw, err := os.Pipe()
			if err != nil {
				cleanup()
				replyErr(ctl, guest.CodeInternal, "exec: %v", err)
				return
			}
			cmd.Stdin, stdinW = pr, pw
			closeAfterStart = append(closeAfterStart, pr)
		}
	}

	proc, err := a.starter.Start(cmd)
	cleanup()
	if err != nil {
		for _, o := range outputs {
			o.r.Close()
		}
		if stdinW != nil && stdinW != ptmx {
			stdinW.Close()
		}
		code := guest.CodeInternal
		if errors.Is(err, fs.ErrNotExist) {
			code = guest.CodeNotFound
		} else if errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.ENOEXEC) {
			code = guest.CodeInvalid
		}
		replyErr(ctl, code, "starting %s: %v", req.Argv[0], err)
		return
	}
	if err := reply(ctl, guest.Reply{PID: proc.Pid()}); err != nil {
		proc.Kill()
	}

	exited := make(chan struct{})
	var copies sync.WaitGroup
	for _, o := range outputs {
		copies.Add(1)
		go func() {
			defer copies.Done()
			copyOutput(o.w, o.r, exited)
			o.w.Close()
		}()
	}
	if stdinW != nil {
		go func() {
			io.Copy(stdinW, streams.stdin)
			if req.TTY {
				// EOF on a terminal is ^D, not a closed descriptor: the master stays open
				// for output.
				ptmx.Write([]byte{4})
				return
			}
			stdinW.Close()
		}()
	}
	go func() {
		for {
			var c guest.Control
			if err := guest.ReadFrame(ctl, &c); err != nil {
				return
			}
			if c.Signal != 0 {
				proc.Signal(syscall.Signal(c.Signal))
			}
			if c.Resize != nil && ptmx != nil {
				pty.Setsize(ptmx, &pty.Winsize{Rows: c.Resize.Rows, Cols: c.Resize.Cols})
			}
		}
	}()

	var timedOut bool
	var timeout <-chan time.Time
	if req.TimeoutMS > 0 {
		t := time.NewTimer(time.Duration(req.TimeoutMS) * time.Millisecond)
		defer t.Stop()
		timeout = t.C
	}
	var ws syscall.WaitStatus
	select {
	case ws = <-proc.Done():
	case <-timeout:
		timedOut = true
		proc.KillGroup()
		ws = <-proc.Done()
	}
	close(exited)
	copies.Wait()
	if stdinW != nil && !req.TTY {
		stdinW.Close()
	}
	if ptmx != nil {
		ptmx.Close()
	}
	guest.WriteFrame(ctl, exitStatus(ws, timedOut))
}

// copyOutput copies r to w until EOF. Once the process has exited, a pipe that stays
// silent for a second is taken as held open by a background child and abandoned, so an
// exec returns when its process does even if `cmd &` leaves a descendant behind.
func copyOutput(w io.Writer, r *os.File, exited <-chan struct{}) {
	defer r.Close()
	var after atomic.Bool
	go func() {
		<-exited
		after.Store(true)
		r.SetReadDeadline(time.Now().Add(time.Second))
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			if after.Load() {
				r.SetReadDeadline(time.Now().Add(time.Second))
			}
		}
		if err != nil {
			// EOF, the deadline above, or EIO: how a pty master reports its terminal
			// side closed.
			return
		}
	}
}

func readFile(s net.Conn, path string) {
	f, err := os.Open(path)
	if err != nil {
		replyErr(s, codeOf(err), "reading %s: %v", path, err)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		replyErr(s, guest.CodeInvalid, "reading %s: not a regular file", path)
		return
	}
	if err := reply(s, guest.Reply{Size: fi.Size(), Mode: uint32(fi.Mode().Perm())}); err != nil {
		return
	}
	io.Copy(s, f)
}

func writeFile(s net.Conn, path string, mode uint32) {
	if !filepath.IsAbs(path) {
		replyErr(s, guest.CodeInvalid, "writing %s: path must be absolute", path)
		return
	}
	if mode == 0 {
		mode = 0o644
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		replyErr(s, codeOf(err), "writing %s: %v", path, err)
		return
	}
	f, err := os.CreateTemp(dir, ".kiln-write-*")
	if err != nil {
		replyErr(s, codeOf(err), "writing %s: %v", path, err)
		return
	}
	tmp := f.Name()
	_, err = io.Copy(f, s)
	if err == nil {
		err = f.Chmod(fs.FileMode(mode).Perm())
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		replyErr(s, codeOf(err), "writing %s: %v", path, err)
		return
	}
	reply(s, guest.Reply{})
}

func codeOf(err error) guest.ErrCode {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return guest.CodeNotFound
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.ENOTDIR):
		return guest.CodeInvalid
	}
	return guest.CodeInternal
}

// connect pipes the stream to a Unix socket in the guest until either side closes.
func connect(s net.Conn, path string) {
	c, err := net.Dial("unix", path)
	if err != nil {
		code := guest.CodeInternal
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ECONNREFUSED) {
			code = guest.CodeNotFound
		}
		replyErr(s, code, "connecting to %s: %v", path, err)
		return
	}
	defer c.Close()
	if err := reply(s, guest.Reply{}); err != nil {
		return
	}
	done := make(chan struct{})
	go func() {
		io.Copy(c, s)
		if uc, ok := c.(*net.UnixConn); ok {
			uc.CloseWrite()
		}
		close(done)
	}()
	io.Copy(s, c)
	s.Close()
	<-done
}
