package guest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"runtime"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// frameTypes are the values either side reads from a frame: the guest reads headers and
// controls from the host, the host reads replies, records and exit statuses from a guest
// it does not trust.
var frameTypes = map[string]func() any{
	"Header":      func() any { return new(Header) },
	"Control":     func() any { return new(Control) },
	"Reply":       func() any { return new(Reply) },
	"Record":      func() any { return new(Record) },
	"ExitStatus":  func() any { return new(ExitStatus) },
	"ProcessStat": func() any { return new(ProcessStat) },
}

// frame is a length prefix followed by payload; the length need not match.
func frame(length uint32, payload string) []byte {
	return append(binary.BigEndian.AppendUint32(nil, length), payload...)
}

// whole frames payload with its own length.
func whole(payload string) []byte { return frame(uint32(len(payload)), payload) }

// framed is what WriteFrame writes for v.
func framed(v any) []byte {
	var b bytes.Buffer
	if err := WriteFrame(&b, v); err != nil {
		panic(err)
	}
	return b.Bytes()
}

// Whatever a peer sends, ReadFrame never panics, never reads (and so never buffers) past
// a frame's end or past maxFrame, refuses a length over maxFrame without reading further,
// and what it accepts writes back to a frame that reads the same.
func FuzzReadFrame(f *testing.F) {
	for _, seed := range [][]byte{
		framed(Header{Version: Version, Op: OpExec, Exec: &ExecRequest{Argv: []string{"sh", "-c", "echo hi"}, Env: []string{"A=b"}, TTY: true, Rows: 24, Cols: 80, TimeoutMS: 1000}}),
		framed(Reply{Error: "no such file", Code: CodeNotFound, Version: Version, PID: 1, Size: 10}),
		framed(Record{Offset: 5, Stream: 1, Time: 1, Data: []byte("out\xff"), Dropped: true, Exit: &ExitStatus{Code: 137, Signal: 9}}),
		framed(ExitStatus{Code: 3, TimedOut: true}),
		framed(ProcessStat{PID: 1, Start: 1, Run: 2, CPUMS: 3, RSS: 4, Command: "sh -c x", Dir: "/", Listen: []Socket{{Proto: "tcp", Address: "[::]:80"}}}),
		framed(Control{Signal: 15, Resize: &WinSize{Rows: 1, Cols: 2}}),
		append(framed(Reply{Version: Version}), framed(Record{Offset: 1, Data: []byte("x")})...),
		// Lengths: none, short, zero, at the cap with little behind it, over the cap, huge.
		nil, {0, 0}, frame(0, ""), frame(maxFrame, "{}"), frame(maxFrame+1, "{}"), frame(1<<31, "{}"), frame(0xffffffff, ""),
		frame(2, "{}{}"), frame(10, "{}"),
		// Payloads: not JSON, not an object, invalid UTF-8, bad base64, overflowing numbers,
		// nesting past encoding/json's depth limit.
		whole("nul"), whole("null"), whole("[]"), whole("{\"op\":\"\xff\"}"),
		whole(`{"d":"!!!!"}`), whole(`{"o":99999999999999999999999}`), whole(`{"code":1e9}`),
		whole(`{"exec":` + strings.Repeat("[", 20000) + strings.Repeat("]", 20000) + `}`),
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for name, newV := range frameTypes {
			r := bytes.NewReader(data)
			for frames := 0; ; frames++ {
				start := len(data) - r.Len()
				v := newV()
				err := ReadFrame(r, v)
				read := len(data) - r.Len() - start
				if read > 4+maxFrame {
					t.Fatalf("%s: frame %d: read %d bytes, over the %d-byte cap", name, frames, read, maxFrame)
				}
				if rest := data[start:]; len(rest) >= 4 {
					length := binary.BigEndian.Uint32(rest)
					if length > maxFrame && read != 4 {
						t.Fatalf("%s: frame %d: length %d is over the cap, yet %d bytes were read", name, frames, length, read)
					}
					if read > 4+int(min(length, maxFrame)) {
						t.Fatalf("%s: frame %d: read %d bytes past a %d-byte frame", name, frames, read-4, length)
					}
				}
				if err != nil {
					break
				}
				out := framed(v)
				again := newV()
				if err := ReadFrame(bytes.NewReader(out), again); err != nil {
					t.Fatalf("%s: reading back %q: %v", name, out, err)
				}
				if b := framed(again); !bytes.Equal(b, out) {
					t.Fatalf("%s: round trip changed %q into %q", name, out, b)
				}
			}
		}
	})
}

// A length field is not a promise: one over the cap is refused after reading only the
// length, and allocates nothing near what it claims.
func TestReadFrameRefusesHugeLength(t *testing.T) {
	for _, length := range []uint32{maxFrame + 1, 1 << 31, 0xffffffff} {
		r := bytes.NewReader(frame(length, strings.Repeat("x", 4096)))
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		err := ReadFrame(r, new(Reply))
		runtime.ReadMemStats(&after)
		if err == nil || !strings.Contains(err.Error(), "exceeds") {
			t.Errorf("length %d: %v; want an error saying the frame exceeds the cap", length, err)
		}
		if read := r.Size() - int64(r.Len()); read != 4 {
			t.Errorf("length %d: read %d bytes; want only the 4 of the length", length, read)
		}
		if grew := after.TotalAlloc - before.TotalAlloc; grew > maxFrame/2 {
			t.Errorf("length %d: allocated %d bytes refusing the frame", length, grew)
		}
	}
}

// A frame over the cap is refused by its writer with an invalid-request error, before a
// byte is sent: the peer would drop the connection and the caller would see "agent lost".
func TestWriteFrameRefusesOversized(t *testing.T) {
	var buf bytes.Buffer
	err := WriteFrame(&buf, map[string]string{"arg": strings.Repeat("<", maxFrame/6+1)})
	if !errors.Is(err, errdefs.ErrInvalid) || buf.Len() != 0 {
		t.Errorf("err = %v, %d bytes written", err, buf.Len())
	}
}
