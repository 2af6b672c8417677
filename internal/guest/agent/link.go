package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
	"time"

	"github.com/kilnhq/kiln/internal/guest"
)

// link serves agent sessions over one long-lived byte stream. It reads everything,
// watching for guest.SyncMagic; each one ends the current session, and the bytes after
// it feed a new one (see guest.SyncMagic for why).
type link struct {
	port io.ReadWriter

	wmu   sync.Mutex // orders writes and epoch changes
	epoch int
	cur   *io.PipeWriter
}

// sessionConn is one session's view of the link: reads come from a pipe fed by the link,
// writes go to the port while the session is current and fail once it is not.
type sessionConn struct {
	*io.PipeReader
	l     *link
	epoch int
}

func (c *sessionConn) Write(p []byte) (int, error) {
	c.l.wmu.Lock()
	defer c.l.wmu.Unlock()
	if c.epoch != c.l.epoch {
		return 0, io.ErrClosedPipe
	}
	return c.l.port.Write(p)
}

// ServeLink serves sessions on port until ctx ends or, if persistent is false, until the
// port reports EOF. A persistent port (virtio-serial) reads EOF whenever no host is
// connected, which is not the end of anything.
func (a *Agent) ServeLink(ctx context.Context, port io.ReadWriter, persistent bool) error {
	l := &link{port: port}
	defer l.endSession()
	var tail []byte // the last bytes read, in case SyncMagic spans two reads
	buf := make([]byte, 64<<10)
	for ctx.Err() == nil {
		n, err := port.Read(buf)
		data := buf[:n]
		for len(data) > 0 {
			joined := append(append([]byte{}, tail...), data...)
			i := bytes.Index(joined, guest.SyncMagic)
			if i < 0 {
				l.forward(data)
				if keep := len(guest.SyncMagic) - 1; len(joined) > keep {
					joined = joined[len(joined)-keep:]
				}
				tail = joined
				break
			}
			if start := i - len(tail); start > 0 {
				l.forward(data[:start])
			}
			data = data[i+len(guest.SyncMagic)-len(tail):]
			tail = nil
			a.startSession(ctx, l)
		}
		if err != nil {
			if !persistent || !errors.Is(err, io.EOF) {
				return err
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return ctx.Err()
}

// forward hands bytes to the current session; it blocks while the session is behind,
// which is what pushes back on a host that writes faster than the guest consumes.
func (l *link) forward(b []byte) {
	l.wmu.Lock()
	w := l.cur
	l.wmu.Unlock()
	if w != nil {
		w.Write(b) // a session that ended takes nothing more
	}
}

func (l *link) endSession() {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if l.cur != nil {
		l.cur.Close()
		l.cur = nil
	}
	l.epoch++
}

func (a *Agent) startSession(ctx context.Context, l *link) {
	pr, pw := io.Pipe()
	l.wmu.Lock()
	if l.cur != nil {
		l.cur.Close()
	}
	l.epoch++
	l.cur = pw
	epoch := l.epoch
	// Written under wmu: no write of the old session can come after it.
	l.port.Write(guest.AckMagic)
	l.wmu.Unlock()
	go a.Serve(ctx, &sessionConn{PipeReader: pr, l: l, epoch: epoch})
}
