package guest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"time"
)

// A virtio-serial port is one byte stream that outlives the hosts connected to it: a host
// that dies mid-session leaves the guest holding half a yamux session, and the next host's
// bytes would land in it. So every host starts with SyncMagic; the guest, which scans for
// it in everything it reads, ends whatever session it had, cuts off that session's
// writes, answers AckMagic, and starts a new session on the bytes that follow. The host
// discards everything before AckMagic: output of the old session still in flight.
var (
	SyncMagic = []byte("\x00kiln-agent-sync\x00\xa7\x3c\x91\x5e\x02\xd8\x6b\xf4\x19\xc0\x77\x2e\x8a\x55\x01")
	AckMagic  = []byte("\x00kiln-agent-ack!\x00\x5b\xe1\x0d\x93\x6a\x27\xcc\x48\xb2\x7f\x30\xe6\x14\xa9\x02")
)

// handshake sends SyncMagic and waits for AckMagic. It returns a reader that yields the
// bytes after the acknowledgement.
func handshake(ctx context.Context, conn net.Conn) (io.Reader, error) {
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
		defer conn.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	if _, err := conn.Write(SyncMagic); err != nil {
		return nil, fmt.Errorf("agent handshake: %w", err)
	}
	var seen []byte
	buf := make([]byte, 4096)
	for {
		n, err := conn.Read(buf)
		seen = append(seen, buf[:n]...)
		if i := bytes.Index(seen, AckMagic); i >= 0 {
			rest := seen[i+len(AckMagic):]
			return io.MultiReader(bytes.NewReader(rest), conn), nil
		}
		if len(seen) > len(AckMagic) {
			// Keep only what could still be the start of the acknowledgement.
			seen = append(seen[:0], seen[len(seen)-len(AckMagic):]...)
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("agent handshake: %w", err)
		}
	}
}

// handshakeConn is conn with the bytes that followed the acknowledgement read first.
type handshakeConn struct {
	net.Conn
	r io.Reader
}

func (c *handshakeConn) Read(p []byte) (int, error) { return c.r.Read(p) }
