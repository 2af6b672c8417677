// Package execstream frames a streaming exec on the connection the API hands over after
// "101 Switching Protocols" (see api.ExecUpgrade and the frame types beside it). The
// server and the Go client both use it.
//
// Flow control is TCP's: a side that stops reading stops the other side's writes, and
// the server passes that back to the guest, whose process blocks in write(2). Nothing is
// buffered beyond one frame.
package execstream

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"sync"

	"github.com/kilnhq/kiln/api"
)

// Conn reads and writes exec frames. Writes are safe for concurrent use; reads are not.
type Conn struct {
	r   io.Reader
	buf []byte

	wmu sync.Mutex
	w   io.Writer
}

// New frames r and w (usually the two halves of one connection).
func New(r io.Reader, w io.Writer) *Conn {
	return &Conn{r: r, w: w, buf: make([]byte, api.ExecFrameMax)}
}

// Write sends p as frames of type typ, split at api.ExecFrameMax. An empty p sends one
// empty frame (for FrameStdin: end of input).
func (c *Conn) Write(typ byte, p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	for first := true; first || len(p) > 0; first = false {
		n := min(len(p), api.ExecFrameMax)
		var h [5]byte
		h[0] = typ
		binary.BigEndian.PutUint32(h[1:], uint32(n))
		if _, err := c.w.Write(h[:]); err != nil {
			return err
		}
		if _, err := c.w.Write(p[:n]); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// WriteJSON sends v as one frame of type typ.
func (c *Conn) WriteJSON(typ byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.Write(typ, b)
}

// Read returns the next frame. The payload is valid until the next Read.
func (c *Conn) Read() (byte, []byte, error) {
	var h [5]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(h[1:])
	if n > api.ExecFrameMax {
		return 0, nil, fmt.Errorf("exec frame of %d bytes exceeds %d: the peer does not speak %s", n, api.ExecFrameMax, api.ExecUpgrade)
	}
	p := c.buf[:n]
	if _, err := io.ReadFull(c.r, p); err != nil {
		return 0, nil, err
	}
	return h[0], p, nil
}

// Stream is an io.Writer that sends what is written as frames of one type.
func (c *Conn) Stream(typ byte) io.Writer { return stream{c, typ} }

type stream struct {
	c   *Conn
	typ byte
}

func (s stream) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if err := s.c.Write(s.typ, p); err != nil {
		return 0, err
	}
	return len(p), nil
}
