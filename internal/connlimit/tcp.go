package connlimit

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Capped is a listener that keeps at most a set number of connections open: past it,
// a new connection is closed as soon as it is accepted. Established sessions (a
// database client, say) are never cut to make room.
type Capped struct {
	net.Listener
	max     int64
	open    atomic.Int64
	refused reporter
}

// Cap wraps ln so that at most max of its connections are open at once. Connections
// it returns release their place when closed. log, if set, hears about refusals at most
// once a minute; what names the listener in it.
func Cap(ln net.Listener, max int, what string, log func(format string, args ...any)) *Capped {
	return &Capped{Listener: ln, max: int64(max), refused: reporter{log: log, what: "connection(s) refused on " + what}}
}

// Accept returns the next connection that fits under the cap.
func (l *Capped) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.open.Add(1) > l.max {
			l.open.Add(-1)
			c.Close()
			l.refused.add(fmt.Sprintf("%d are open, the most allowed", l.max))
			continue
		}
		return &counted{Conn: c, l: l}, nil
	}
}

// Open is how many accepted connections are open now.
func (l *Capped) Open() int { return int(l.open.Load()) }

type counted struct {
	net.Conn
	l    *Capped
	once sync.Once
}

func (c *counted) Close() error {
	c.once.Do(func() { c.l.open.Add(-1) })
	return c.Conn.Close()
}

// CloseWrite half-closes the connection where the underlying one can.
func (c *counted) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// Pipe copies between a and b both ways until both directions have ended, or until no
// byte has passed either way for idle; then it closes both. An end of stream in one
// direction is passed on as a half-close, and the other direction goes on.
func Pipe(a, b net.Conn, idle time.Duration) {
	var last atomic.Int64 // when a byte last passed, either way (UnixNano)
	last.Store(time.Now().UnixNano())
	idleFor := func() time.Duration { return time.Since(time.Unix(0, last.Load())) }
	cleanEOF := make(chan bool, 2)
	cp := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			src.SetReadDeadline(time.Now().Add(idle))
			n, err := src.Read(buf)
			if n > 0 {
				last.Store(time.Now().UnixNano())
				// A peer that stops reading stalls the copy: that, too, is idleness.
				dst.SetWriteDeadline(time.Now().Add(idle))
				if _, werr := dst.Write(buf[:n]); werr != nil {
					cleanEOF <- false
					return
				}
			}
			switch {
			case err == nil:
			case errors.Is(err, os.ErrDeadlineExceeded) && idleFor() < idle:
				// Quiet this way, busy the other: wait on.
			default:
				clean := errors.Is(err, io.EOF)
				if clean {
					if cw, ok := dst.(interface{ CloseWrite() error }); ok {
						cw.CloseWrite()
					}
				}
				cleanEOF <- clean
				return
			}
		}
	}
	go cp(a, b)
	go cp(b, a)
	if !<-cleanEOF {
		// Idle, reset or failed: end the other direction too.
		a.Close()
		b.Close()
	}
	<-cleanEOF
	a.Close()
	b.Close()
}
