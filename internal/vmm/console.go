package vmm

import (
	"errors"
	"io"
	"os"
)

// ConsoleLogCap bounds a VM's console log on the host. The log is two files, the current
// one and the one before it (path.1); when the current one reaches half the cap it
// replaces the previous one and a new one starts, so the newest output is always kept
// and a guest that writes to its console without end fills nothing.
var ConsoleLogCap int64 = 4 << 20

// CaptureConsole copies the guest console r into the log at path, bounded by
// ConsoleLogCap, until r ends (the VMM exited or closed it). It appends to a log already
// there, as after a restart of kiln.
func CaptureConsole(r io.Reader, path string) error {
	w := &rotatingFile{path: path, limit: max(ConsoleLogCap/2, 1)}
	defer w.close()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if werr := w.write(buf[:n]); werr != nil {
				// Keep reading: a console that is not drained stalls the guest.
				io.Copy(io.Discard, r)
				return werr
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

type rotatingFile struct {
	path  string
	limit int64
	f     *os.File
	size  int64
}

func (w *rotatingFile) write(p []byte) error {
	for len(p) > 0 {
		if w.f == nil {
			f, err := os.OpenFile(w.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
			if err != nil {
				return err
			}
			fi, err := f.Stat()
			if err != nil {
				f.Close()
				return err
			}
			w.f, w.size = f, fi.Size()
		}
		if w.size >= w.limit {
			w.f.Close()
			w.f = nil
			if err := os.Rename(w.path, w.path+".1"); err != nil {
				return err
			}
			continue
		}
		n := min(int64(len(p)), w.limit-w.size)
		if _, err := w.f.Write(p[:n]); err != nil {
			return err
		}
		w.size += n
		p = p[n:]
	}
	return nil
}

func (w *rotatingFile) close() {
	if w.f != nil {
		w.f.Close()
	}
}

// ConsoleTail returns at most n bytes from the end of the console log at path, reading
// the previous file (path.1) for what the current one lacks; it reads nothing else.
func ConsoleTail(path string, n int64) []byte {
	cur := fileTail(path, n)
	if int64(len(cur)) >= n {
		return cur
	}
	return append(fileTail(path+".1", n-int64(len(cur))), cur...)
}

func fileTail(path string, n int64) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil
	}
	off := max(fi.Size()-n, 0)
	b := make([]byte, fi.Size()-off)
	k, _ := f.ReadAt(b, off)
	return b[:k]
}
