package machinelog

import (
	"bytes"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/guest"
)

func TestLogLinesAreBounded(t *testing.T) {
	dir := t.TempDir()
	l, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	// 200 KiB without a newline, then a short line: stored in pieces of at most maxLine,
	// nothing held back, bytes intact.
	big := bytes.Repeat([]byte("x"), 200<<10)
	l.Add(guest.Record{Offset: 0, Stream: 1, Data: big})
	l.Add(guest.Record{Offset: int64(len(big)), Stream: 1, Data: []byte("\nend\n")})
	l.Close()
	var got []string
	Read(dir, false, nil, func(line api.LogLine) error {
		got = append(got, line.Message)
		return nil
	})
	total := 0
	for _, m := range got[:len(got)-1] {
		if len(m) > maxLine {
			t.Errorf("a stored line of %d bytes", len(m))
		}
		total += len(m)
	}
	if total != len(big) || got[len(got)-1] != "end" {
		t.Errorf("stored %d of %d bytes, last line %q", total, len(big), got[len(got)-1])
	}
	if off := (&File{dir: dir}).Offset(); off != int64(len(big))+5 {
		t.Errorf("offset %d", off)
	}
}

func TestLogRotationKeepsNewest(t *testing.T) {
	old := LogCap
	LogCap = 64 << 10
	defer func() { LogCap = old }()
	dir := t.TempDir()
	l, _ := Open(dir)
	var off int64
	for i := 0; i < 2000; i++ {
		line := []byte(strings.Repeat("y", 50) + "\n")
		l.Add(guest.Record{Offset: off, Stream: 1, Data: line})
		off += int64(len(line))
	}
	l.Add(guest.Record{Offset: off, Stream: 2, Data: []byte("last\n")})
	l.Close()
	var n int
	var last api.LogLine
	Read(dir, false, nil, func(line api.LogLine) error { n++; last = line; return nil })
	if n >= 2000 || n == 0 || last.Message != "last" || last.Stream != "stderr" {
		t.Errorf("%d lines kept, last %+v", n, last)
	}
}
