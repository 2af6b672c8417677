// Package connlimittest plays the slow and hostile clients that connlimit's limits are
// for, in tests of the servers that use them.
package connlimittest

import (
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// Dial opens a TCP connection that the test closes at its end.
func Dial(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// HalfOpen opens an HTTP connection that sends a request line and never ends its
// headers.
func HalfOpen(t testing.TB, addr string) net.Conn {
	t.Helper()
	c := Dial(t, addr)
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n"); err != nil {
		t.Fatal(err)
	}
	return c
}

// ClosedWithin reports whether the peer closes c within d; what it sends meanwhile is
// discarded.
func ClosedWithin(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	return !errors.Is(err, os.ErrDeadlineExceeded)
}
