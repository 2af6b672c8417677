package build

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"

	"github.com/kilnhq/kiln/internal/buildcontext"
)

// cappedWriter writes up to max bytes, then one line saying the rest was dropped.
type cappedWriter struct {
	w         io.Writer
	max, n    int64
	truncated bool
}

func (c *cappedWriter) Write(p []byte) (int, error) {
	if c.truncated {
		return len(p), nil
	}
	if c.n+int64(len(p)) > c.max {
		keep := c.max - c.n
		c.w.Write(p[:keep])
		fmt.Fprintf(c.w, "\n[kiln: the log reached its cap of %d KiB; the rest of this build's output is not kept]\n", c.max>>10)
		c.truncated = true
		c.n = c.max
		return len(p), nil
	}
	c.n += int64(len(p))
	return c.w.Write(p)
}

// packDir writes dir as a gzipped tar, for the store.
func packDir(dir string) ([]byte, error) {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if err := buildcontext.WriteTar(zw, dir, nil); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// unpackStored restores a context packDir made.
func unpackStored(data []byte, dir string, max int64) error {
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	_, err = buildcontext.Extract(zr, dir, max)
	return err
}
