package guest_test

import (
	"io"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/guest"
)

// Whatever is written, the buffer keeps the first Max bytes and accepts the rest, so the
// copy from the guest keeps draining.
func TestLimitedBuffer(t *testing.T) {
	b := &guest.LimitedBuffer{Max: 100}
	n, err := io.Copy(b, io.LimitReader(strings.NewReader(strings.Repeat("a", 10000)), 10000))
	if err != nil || n != 10000 {
		t.Fatalf("copy: %d %v", n, err)
	}
	if len(b.String()) != 100 || !b.Truncated {
		t.Errorf("kept %d bytes, truncated %v", len(b.String()), b.Truncated)
	}
	small := &guest.LimitedBuffer{Max: 100}
	small.Write([]byte("hi"))
	if small.String() != "hi" || small.Truncated {
		t.Errorf("small: %q %v", small.String(), small.Truncated)
	}
}
