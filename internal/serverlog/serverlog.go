// Package serverlog makes the kiln server's one logger (log/slog, text or JSON on
// stderr) and adapts the parts that still log lines to an io.Writer, so that every line
// the server writes is one record of the chosen format. internal/daemon makes it and
// hands it down; nothing else makes a logger of its own.
package serverlog

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"sync"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/reqid"
)

// Formats are what --log-format takes.
var Formats = []string{"text", "json"}

// For returns base with the request id of ctx's API call on every line (base itself
// outside one). A nil base logs nothing.
func For(ctx context.Context, base *slog.Logger) *slog.Logger {
	if base == nil {
		return slog.New(slog.DiscardHandler)
	}
	if id := reqid.From(ctx); id != "" {
		return base.With(reqid.Attr, id)
	}
	return base
}

// New returns a logger writing records to w in format ("text", "" for text, or "json").
func New(w io.Writer, format string) (*slog.Logger, error) {
	switch format {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, nil)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, nil)), nil
	}
	return nil, errdefs.Invalid("--log-format %q: want text or json", format)
}

// maxLine bounds one record's message: a line longer than this is cut into several.
const maxLine = 16 << 10

// Writer returns a writer that logs each line written to it as one record at level
// Info, without the "kiln: " prefix those parts put on their lines. A line is logged
// once its newline arrives; what is written without one waits for the next write. It
// is safe for concurrent use, as the parts writing to it log from many goroutines.
func Writer(l *slog.Logger) io.Writer {
	if l == nil {
		return io.Discard
	}
	return &lineWriter{l: l}
}

type lineWriter struct {
	l   *slog.Logger
	mu  sync.Mutex
	buf []byte
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(p)
	for len(p) > 0 {
		end := bytes.IndexByte(p, '\n')
		whole := end >= 0
		if !whole {
			end = len(p)
		}
		take := min(end, maxLine-len(w.buf))
		w.buf = append(w.buf, p[:take]...)
		p = p[take:]
		switch {
		case whole && take == end:
			p = p[1:] // the newline
			w.flushLocked()
		case len(w.buf) == maxLine:
			w.flushLocked()
		}
	}
	return n, nil
}

func (w *lineWriter) flushLocked() {
	line := bytes.TrimPrefix(bytes.TrimRight(w.buf, "\r"), []byte("kiln: "))
	if len(bytes.TrimSpace(line)) > 0 {
		w.l.Log(context.Background(), slog.LevelInfo, string(line))
	}
	w.buf = w.buf[:0]
}
