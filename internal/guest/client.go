package guest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/reqid"
)

// SessionConfig is the yamux configuration both ends use. Keepalives are off: a paused
// or suspended VM must not look dead, and a dead VMM closes the transport, which ends
// every stream at once.
func SessionConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.EnableKeepAlive = false
	c.LogOutput = nil
	c.Logger = log.New(io.Discard, "", 0)
	// Under software emulation a guest can be slow to drain; do not give up on a write
	// that is merely waiting for the window to open.
	c.ConnectionWriteTimeout = 60 * time.Second
	return c
}

// Client talks to one guest agent. It is safe for concurrent use.
type Client struct {
	sess  *yamux.Session
	Hello Reply
}

// Connect runs the agent protocol over conn (already connected to the guest) and checks
// the guest speaks this protocol version. Connect owns conn from then on.
func Connect(ctx context.Context, conn net.Conn) (*Client, error) {
	r, err := handshake(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "guest agent did not answer")
	}
	sess, err := yamux.Client(&handshakeConn{Conn: conn, r: r}, SessionConfig())
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("starting agent session: %w", err)
	}
	c := &Client{sess: sess}
	s, err := c.open(ctx, Header{Op: OpHello})
	if err != nil {
		sess.Close()
		return nil, err
	}
	defer s.Close()
	if err := c.readReply(ctx, s, &c.Hello); err != nil {
		sess.Close()
		return nil, err
	}
	if c.Hello.Version != Version {
		sess.Close()
		return nil, errdefs.New(errdefs.ErrProtocol,
			"guest agent speaks protocol v%d, this kiln speaks v%d: rebuild the guest assets with `make setup` (or `kiln assets build`)",
			c.Hello.Version, Version)
	}
	return c, nil
}

// Close ends the session; streams in flight fail with ErrUnavailable.
func (c *Client) Close() error { return c.sess.Close() }

// Dial connects with dial and runs Connect.
func Dial(ctx context.Context, dial func(context.Context) (net.Conn, error)) (*Client, error) {
	conn, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	return Connect(ctx, conn)
}

// Done is closed when the transport to the guest is gone.
func (c *Client) Done() <-chan struct{} { return c.sess.CloseChan() }

func (c *Client) open(ctx context.Context, h Header) (*yamux.Stream, error) {
	h.Version = Version
	h.RequestID = reqid.From(ctx) // an API call's, so the guest's lines about it carry it
	s, err := c.sess.OpenStream()
	if err != nil {
		return nil, c.lost(err)
	}
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	if err := WriteFrame(s, h); err != nil {
		s.Close()
		return nil, c.lost(err)
	}
	return s, nil
}

// readReply reads one reply; ctx cancellation closes the stream to unblock the read.
func (c *Client) readReply(ctx context.Context, s *yamux.Stream, r *Reply) error {
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	if err := ReadFrame(s, r); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return c.lost(err)
	}
	return replyErr(r)
}

func replyErr(r *Reply) error {
	if r.Error == "" {
		return nil
	}
	switch r.Code {
	case CodeNotFound:
		return errdefs.New(errdefs.ErrNotFound, "%s", r.Error)
	case CodeInvalid:
		return errdefs.New(errdefs.ErrInvalid, "%s", r.Error)
	case CodeVersion:
		return errdefs.New(errdefs.ErrProtocol, "%s", r.Error)
	}
	return errors.New(r.Error)
}

// lost classifies a transport failure.
func (c *Client) lost(err error) error {
	return errdefs.Wrap(errdefs.ErrUnavailable, err, "connection to guest agent lost (the VM stopped or its VMM died)")
}

// Sync flushes the guest's filesystems.
func (c *Client) Sync(ctx context.Context) error {
	s, err := c.open(ctx, Header{Op: OpSync})
	if err != nil {
		return err
	}
	defer s.Close()
	return c.readReply(ctx, s, &Reply{})
}

// PowerOff syncs and unmounts the guest's disks, then turns the VM off. It returns once
// the guest has acknowledged; the VMM exits shortly after.
func (c *Client) PowerOff(ctx context.Context) error {
	s, err := c.open(ctx, Header{Op: OpPowerOff})
	if err != nil {
		return err
	}
	defer s.Close()
	return c.readReply(ctx, s, &Reply{})
}

// ReadFile copies the guest file at path to w.
func (c *Client) ReadFile(ctx context.Context, path string, w io.Writer) (int64, error) {
	s, err := c.open(ctx, Header{Op: OpReadFile, Path: path})
	if err != nil {
		return 0, err
	}
	defer s.Close()
	var r Reply
	if err := c.readReply(ctx, s, &r); err != nil {
		return 0, err
	}
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	n, err := io.Copy(w, s)
	if err == nil && n != r.Size {
		err = fmt.Errorf("reading %s: got %d of %d bytes", path, n, r.Size)
	}
	return n, err
}

// WriteFile replaces the guest file at path with the contents of r, atomically.
func (c *Client) WriteFile(ctx context.Context, path string, mode uint32, r io.Reader) error {
	s, err := c.open(ctx, Header{Op: OpWriteFile, Path: path, Mode: mode})
	if err != nil {
		return err
	}
	defer s.Close()
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	if _, err := io.Copy(s, r); err != nil {
		return c.lost(err)
	}
	// Half-close: the guest sees EOF, commits the file and replies.
	if err := s.Close(); err != nil {
		return c.lost(err)
	}
	return c.readReply(ctx, s, &Reply{})
}

// Process is a running guest process.
type Process struct {
	c      *Client
	PID    int
	ctl    *yamux.Stream
	ctlMu  sync.Mutex
	copies sync.WaitGroup
	copyMu sync.Mutex
	cerr   error
	exit   chan struct{}
	status ExitStatus
	err    error
}

// IO connects a process to the caller. Nil Stdin means the process reads /dev/null; nil
// Stdout or Stderr discards that stream. With a TTY, Stderr is unused.
type IO struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
}

// Start starts req in the guest. A command that does not exist returns an error of kind
// errdefs.ErrNotFound; callers that mimic a shell report exit code 127.
func (c *Client) Start(ctx context.Context, req ExecRequest, pio IO) (*Process, error) {
	if len(req.Argv) == 0 {
		return nil, errdefs.Invalid("exec: no command given")
	}
	var tb [12]byte
	rand.Read(tb[:])
	token := hex.EncodeToString(tb[:])
	req.Stdin = pio.Stdin != nil

	p := &Process{c: c, exit: make(chan struct{})}
	var streams []*yamux.Stream
	fail := func(err error) (*Process, error) {
		for _, s := range streams {
			s.Close()
		}
		return nil, err
	}
	outputs := []struct {
		op Op
		w  io.Writer
	}{{OpStdout, pio.Stdout}}
	if !req.TTY {
		outputs = append(outputs, struct {
			op Op
			w  io.Writer
		}{OpStderr, pio.Stderr})
	}
	var readers []func()
	for _, o := range outputs {
		s, err := c.open(ctx, Header{Op: o.op, Token: token})
		if err != nil {
			return fail(err)
		}
		streams = append(streams, s)
		w := o.w
		if w == nil {
			w = io.Discard
		}
		readers = append(readers, func() {
			defer p.copies.Done()
			defer s.Close()
			if _, err := io.Copy(w, s); err != nil {
				p.setCopyErr(err)
			}
		})
	}
	var stdin *yamux.Stream
	if req.Stdin {
		s, err := c.open(ctx, Header{Op: OpStdin, Token: token})
		if err != nil {
			return fail(err)
		}
		streams = append(streams, s)
		stdin = s
	}
	ctl, err := c.open(ctx, Header{Op: OpExec, Token: token, Exec: &req})
	if err != nil {
		return fail(err)
	}
	streams = append(streams, ctl)
	var r Reply
	if err := c.readReply(ctx, ctl, &r); err != nil {
		return fail(err)
	}
	p.PID, p.ctl = r.PID, ctl
	p.copies.Add(len(readers))
	for _, f := range readers {
		go f()
	}
	if stdin != nil {
		go func() {
			// The process may exit before it reads all of stdin; that is not an error.
			io.Copy(stdin, pio.Stdin)
			stdin.Close()
		}()
	}
	go p.waitExit()
	return p, nil
}

func (p *Process) setCopyErr(err error) {
	p.copyMu.Lock()
	defer p.copyMu.Unlock()
	if p.cerr == nil {
		p.cerr = err
	}
}

func (p *Process) waitExit() {
	defer close(p.exit)
	var st ExitStatus
	err := ReadFrame(p.ctl, &st)
	// The guest sends the status only after closing stdout and stderr, so the copies end
	// now or soon; wait for them so the caller has every byte when Wait returns.
	p.copies.Wait()
	p.ctl.Close()
	if err != nil {
		p.err = p.c.lost(err)
		return
	}
	if p.cerr != nil {
		p.err = fmt.Errorf("copying output: %w", p.cerr)
	}
	p.status = st
}

// Signal delivers sig to the process.
func (p *Process) Signal(sig int) error {
	return p.control(Control{Signal: sig})
}

// Resize changes the TTY's size.
func (p *Process) Resize(rows, cols uint16) error {
	return p.control(Control{Resize: &WinSize{Rows: rows, Cols: cols}})
}

func (p *Process) control(c Control) error {
	p.ctlMu.Lock()
	defer p.ctlMu.Unlock()
	if err := WriteFrame(p.ctl, c); err != nil {
		return p.c.lost(err)
	}
	return nil
}

// Wait returns the exit status once the process ended and all its output was copied.
// If ctx ends first, Wait returns ctx.Err() and the process keeps running.
func (p *Process) Wait(ctx context.Context) (ExitStatus, error) {
	select {
	case <-p.exit:
		return p.status, p.err
	case <-ctx.Done():
		return ExitStatus{}, ctx.Err()
	}
}

// Exec starts req and waits for it: the common case.
func (c *Client) Exec(ctx context.Context, req ExecRequest, pio IO) (ExitStatus, error) {
	p, err := c.Start(ctx, req, pio)
	if err != nil {
		return ExitStatus{}, err
	}
	return p.Wait(ctx)
}

// Spawn starts a supervised process named id: the guest keeps it and a bounded tail of
// its output whatever happens to this connection. Read the output with Follow.
func (c *Client) Spawn(ctx context.Context, id string, req ExecRequest) (int, error) {
	if len(req.Argv) == 0 {
		return 0, errdefs.Invalid("spawn: no command given")
	}
	s, err := c.open(ctx, Header{Op: OpSpawn, ID: id, Exec: &req})
	if err != nil {
		return 0, err
	}
	defer s.Close()
	var r Reply
	if err := c.readReply(ctx, s, &r); err != nil {
		return 0, err
	}
	return r.PID, nil
}

// Follow reads supervised process id's output from offset, calling fn for each record
// in order. With follow it waits for more output until the process ends. It returns the
// last record: its Exit is set if the process has ended.
func (c *Client) Follow(ctx context.Context, id string, offset int64, follow bool, fn func(Record) error) (Record, error) {
	s, err := c.open(ctx, Header{Op: OpFollow, ID: id, Offset: offset, Follow: follow})
	if err != nil {
		return Record{}, err
	}
	defer s.Close()
	if err := c.readReply(ctx, s, &Reply{}); err != nil {
		return Record{}, err
	}
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	for {
		var r Record
		if err := ReadFrame(s, &r); err != nil {
			if ctx.Err() != nil {
				return Record{}, ctx.Err()
			}
			return Record{}, c.lost(err)
		}
		if r.Exit != nil || r.Running || (len(r.Data) == 0 && !follow) {
			return r, nil
		}
		if err := fn(r); err != nil {
			return r, err
		}
	}
}

// Connect opens a connection to the Unix socket at path inside the guest.
func (c *Client) Connect(ctx context.Context, path string) (net.Conn, error) {
	s, err := c.open(ctx, Header{Op: OpConnect, Path: path})
	if err != nil {
		return nil, err
	}
	if err := c.readReply(ctx, s, &Reply{}); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// SignalSupervised delivers sig to supervised process id.
func (c *Client) SignalSupervised(ctx context.Context, id string, sig int) error {
	s, err := c.open(ctx, Header{Op: OpSignal, ID: id, Signal: sig})
	if err != nil {
		return err
	}
	defer s.Close()
	return c.readReply(ctx, s, &Reply{})
}

// SetTime sets the guest's wall clock to t.
func (c *Client) SetTime(ctx context.Context, t time.Time) error {
	s, err := c.open(ctx, Header{Op: OpSetTime, Time: t.UnixNano()})
	if err != nil {
		return err
	}
	defer s.Close()
	return c.readReply(ctx, s, &Reply{})
}

// maxPsBytes bounds the bytes a ps answer may take on the wire: MaxProcs entries of
// bounded strings fit in a fraction of it, even with every byte JSON-escaped. It bounds
// the time a guest can keep the host reading, as MaxProcs and Bounded bound what is kept.
const maxPsBytes = 64 << 20

// Ps lists the guest's processes, at most MaxProcs of them, each held to
// ProcessStat.Bounded whatever the guest sends. An agent from a release without ps
// fails with ErrProtocol, saying a restart brings the current one.
func (c *Client) Ps(ctx context.Context) ([]ProcessStat, error) {
	if !c.Hello.Serves(OpPs) {
		return nil, errdefs.New(errdefs.ErrProtocol, "this VM's guest agent predates ps: restart the machine so that it boots the current guest assets")
	}
	s, err := c.open(ctx, Header{Op: OpPs})
	if err != nil {
		return nil, err
	}
	defer s.Close()
	var r Reply
	if err := c.readReply(ctx, s, &r); err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	// Entries past MaxProcs are never read: closing the stream drops them.
	n := min(max(r.Count, 0), MaxProcs)
	in := &io.LimitedReader{R: s, N: maxPsBytes}
	procs := make([]ProcessStat, 0, n)
	kept := 0
	for range n {
		var p ProcessStat
		if err := ReadFrame(in, &p); err != nil {
			switch {
			case ctx.Err() != nil:
				return nil, ctx.Err()
			case in.N == 0:
				return nil, errdefs.New(errdefs.ErrProtocol, "the guest's process list is over %d bytes: it is not a kiln agent's answer", maxPsBytes)
			}
			return nil, c.lost(err)
		}
		p = p.Bounded()
		if kept += p.size(); kept > maxPsKept {
			// A list an honest guest never sends: keep what fits, so the answer (JSON
			// that can escape each byte into six) stays a few tens of MiB at most.
			break
		}
		procs = append(procs, p)
	}
	return procs, nil
}

// maxPsKept bounds the text a ps answer keeps: a thousand processes with long command
// lines fit several times over.
const maxPsKept = 2 << 20

// size is roughly the bytes p holds.
func (p ProcessStat) size() int {
	n := len(p.Command) + len(p.Dir) + 64
	for _, s := range p.Listen {
		n += len(s.Proto) + len(s.Address)
	}
	return n
}

// Stats reads the guest's own view of its memory, load and filesystems, held to
// Stats.Bounded and MaxStatsBytes whatever the guest sends. An agent from a release
// without stats fails with ErrProtocol without being asked.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	if !c.Hello.Serves(OpStats) {
		return Stats{}, errdefs.New(errdefs.ErrProtocol, "this VM's guest agent predates stats: restart the machine so that it boots the current guest assets")
	}
	s, err := c.open(ctx, Header{Op: OpStats})
	if err != nil {
		return Stats{}, err
	}
	defer s.Close()
	if err := c.readReply(ctx, s, &Reply{}); err != nil {
		return Stats{}, err
	}
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	in := &io.LimitedReader{R: s, N: MaxStatsBytes}
	var st Stats
	if err := ReadFrame(in, &st); err != nil {
		switch {
		case ctx.Err() != nil:
			return Stats{}, ctx.Err()
		case in.N == 0:
			return Stats{}, errdefs.New(errdefs.ErrProtocol, "the guest's stats are over %d bytes: it is not a kiln agent's answer", MaxStatsBytes)
		}
		return Stats{}, c.lost(err)
	}
	return st.Bounded(), nil
}
