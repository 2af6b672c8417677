// Package machinelog keeps a machine's workload output on the host: bounded, private to
// kiln, rotated oldest first, with how far into the guest's output it has got so that a
// restarted kiln goes on without losing or repeating lines.
package machinelog

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/guest"
)

// LogCap bounds the workload output kept per machine on the host; when the current file
// passes half of it, it becomes the old file and the previous old file is dropped, so the
// oldest output goes first.
var LogCap int64 = 16 << 20

// File is a machine's stored workload output plus how far into the guest's output it
// has got, so that a restarted kiln resumes without losing or repeating lines.
type File struct {
	mu   sync.Mutex
	dir  string
	f    *os.File
	size int64
	// partial holds a line's start until its newline arrives, per stream.
	partial map[int][]byte
	// off is where in the guest's output the stored log ends (once known: read from the
	// offset file first); the file has it as of saved.
	off      int64
	offKnown bool
	saved    time.Time
	dirty    bool
}

// offsetEvery bounds how often the offset file is written while output flows. Each
// write is flushed to disk, so writing it per record would let a chatty guest make the
// host's disk flush thousands of times a second; a crash repeats at most this much
// output, and loses none.
const offsetEvery = 250 * time.Millisecond

// Open opens a machine's log, which only kiln may read: workloads print secrets.
func Open(dir string) (*File, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, "output.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	f.Chmod(0o600) // one that an older kiln made readable to all
	fi, _ := f.Stat()
	return &File{dir: dir, f: f, size: fi.Size(), partial: map[int][]byte{}}, nil
}

func (l *File) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.dirty {
		l.saveOffsetLocked()
	}
	l.f.Close()
}

// offset is where in the guest's output the stored log ends.
func (l *File) Offset() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.offKnown {
		b, _ := os.ReadFile(filepath.Join(l.dir, "offset"))
		l.off, _ = strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		l.offKnown = true
	}
	return l.off
}

// reset starts following a new workload's output from its beginning.
func (l *File) Reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.off, l.offKnown = 0, true
	l.saveOffsetLocked()
}

// saveOffsetLocked writes the offset file: a crash leaves the old offset or the new,
// never none.
func (l *File) saveOffsetLocked() error {
	l.saved, l.dirty = time.Now(), false
	return atomicfile.WriteFile(filepath.Join(l.dir, "offset"), []byte(strconv.FormatInt(l.off, 10)), 0o600)
}

// add stores a record's complete lines and remembers the offset after it.
func (l *File) Add(r guest.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	buf := append(l.partial[r.Stream], r.Data...)
	stream := "stdout"
	if r.Stream == 2 {
		stream = "stderr"
	}
	ts := time.Unix(0, r.Time).UTC()
	var werr error
	for {
		i := bytes.IndexByte(buf, '\n')
		if i < 0 {
			// Output without newlines (progress bars, binary) is stored in pieces rather
			// than held in memory until a newline that may never come.
			if len(buf) < maxLine {
				break
			}
			i = maxLine
		}
		if err := l.writeLocked(api.LogLine{Timestamp: ts, Stream: stream, Message: string(buf[:i])}); err != nil && werr == nil {
			werr = err
		}
		if i < len(buf) && buf[i] == '\n' {
			i++
		}
		buf = buf[i:]
	}
	l.partial[r.Stream] = append([]byte(nil), buf...)
	l.off, l.offKnown, l.dirty = r.Offset+int64(len(r.Data)), true, true
	if time.Since(l.saved) >= offsetEvery {
		if err := l.saveOffsetLocked(); err != nil {
			return err
		}
	}
	return werr
}

// maxLine bounds one stored line.
const maxLine = 64 << 10

// flush stores unterminated lines, at the workload's end.
func (l *File) Flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for s, b := range l.partial {
		if len(b) > 0 {
			stream := "stdout"
			if s == 2 {
				stream = "stderr"
			}
			l.writeLocked(api.LogLine{Timestamp: time.Now().UTC(), Stream: stream, Message: string(b)})
		}
	}
	l.partial = map[int][]byte{}
}

func (l *File) writeLocked(line api.LogLine) error {
	b, _ := json.Marshal(line)
	b = append(b, '\n')
	if l.size+int64(len(b)) > LogCap/2 {
		l.f.Close()
		cur := filepath.Join(l.dir, "output.log")
		os.Rename(cur, cur+".1")
		f, err := os.OpenFile(cur, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		l.f, l.size = f, 0
	}
	n, err := l.f.Write(b)
	l.size += int64(n)
	return err
}

// Read calls fn for each stored line of a machine's output, oldest first, then, with
// follow, for new lines until stop is closed.
func Read(dir string, follow bool, stop <-chan struct{}, fn func(api.LogLine) error) error {
	send := func(r *bufio.Reader) error {
		for {
			line, err := r.ReadBytes('\n')
			if len(line) > 0 && line[len(line)-1] == '\n' {
				var l api.LogLine
				if json.Unmarshal(line, &l) == nil {
					if err := fn(l); err != nil {
						return err
					}
				}
			} else if len(line) > 0 {
				return errPartial(len(line))
			}
			if err != nil {
				return nil
			}
		}
	}
	if f, err := os.Open(filepath.Join(dir, "output.log.1")); err == nil {
		err := send(bufio.NewReader(f))
		f.Close()
		if err != nil {
			return err
		}
	}
	f, err := os.Open(filepath.Join(dir, "output.log"))
	if err != nil {
		if os.IsNotExist(err) && !follow {
			return nil
		}
		if !os.IsNotExist(err) {
			return err
		}
	}
	var off int64
	for {
		if f != nil {
			f.Seek(off, 0)
			r := bufio.NewReader(f)
			err := send(r)
			if p, ok := err.(errPartial); ok {
				err = nil
				cur, _ := f.Seek(0, 1)
				off = cur - int64(r.Buffered()) - int64(p)
			} else {
				cur, _ := f.Seek(0, 1)
				off = cur - int64(r.Buffered())
			}
			if err != nil {
				f.Close()
				return err
			}
		}
		if !follow {
			if f != nil {
				f.Close()
			}
			return nil
		}
		select {
		case <-stop:
			if f != nil {
				f.Close()
			}
			return nil
		case <-time.After(200 * time.Millisecond):
		}
		// The file may have been rotated: start over on the new one.
		if fi, err := os.Stat(filepath.Join(dir, "output.log")); err == nil {
			if f == nil || fi.Size() < off {
				if f != nil {
					f.Close()
				}
				f, _ = os.Open(filepath.Join(dir, "output.log"))
				off = 0
			}
		}
	}
}

// errPartial reports a trailing line without its newline: written but not finished.
type errPartial int

func (e errPartial) Error() string { return "partial line" }
