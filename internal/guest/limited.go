package guest

import "bytes"

// LimitedBuffer keeps the first Max bytes written to it and discards the rest, saying so
// in Truncated. It never fails a write: the copy from the guest goes on draining the
// stream, so the process is not left blocked on a full pipe and still reports its real
// exit status, while what the host holds in memory stays at Max whatever it prints.
type LimitedBuffer struct {
	Max       int
	Truncated bool
	buf       bytes.Buffer
}

func (b *LimitedBuffer) Write(p []byte) (int, error) {
	room := b.Max - b.buf.Len()
	if len(p) > room {
		b.Truncated = true
		b.buf.Write(p[:max(room, 0)])
		return len(p), nil
	}
	return b.buf.Write(p)
}

// String returns what was kept.
func (b *LimitedBuffer) String() string { return b.buf.String() }
