package execstream_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/execstream"
)

func TestRoundTrip(t *testing.T) {
	var wire bytes.Buffer
	c := execstream.New(&wire, &wire)
	big := bytes.Repeat([]byte("0123456789"), api.ExecFrameMax/5) // two frames' worth
	io.Copy(c.Stream(api.FrameStdout), bytes.NewReader(big))
	c.Write(api.FrameStdin, nil)
	c.WriteJSON(api.FrameExit, api.ExecExit{ExitCode: 3})
	var out []byte
	var frames int
	for {
		typ, p, err := c.Read()
		if err != nil {
			t.Fatalf("after %d frames: %v", frames, err)
		}
		frames++
		if len(p) > api.ExecFrameMax {
			t.Fatalf("frame of %d bytes", len(p))
		}
		switch typ {
		case api.FrameStdout:
			out = append(out, p...)
			continue
		case api.FrameStdin:
			if len(p) != 0 {
				t.Errorf("end of input carries %d bytes", len(p))
			}
			continue
		}
		if typ != api.FrameExit || string(p) != `{"exit_code":3}` {
			t.Errorf("last frame %d %q", typ, p)
		}
		break
	}
	if !bytes.Equal(out, big) || frames < 4 {
		t.Errorf("stdout: %d bytes in %d frames, want %d", len(out), frames, len(big))
	}
}

// A peer announcing a frame larger than the maximum is refused before anything is
// allocated for it.
func TestOversizedFrame(t *testing.T) {
	var h [5]byte
	h[0] = api.FrameStdin
	binary.BigEndian.PutUint32(h[1:], 1<<31)
	c := execstream.New(bytes.NewReader(h[:]), io.Discard)
	if _, _, err := c.Read(); err == nil || !strings.Contains(err.Error(), "exceeds") {
		t.Errorf("oversized frame: %v", err)
	}
}
