package buildcontext_test

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/buildcontext"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// fuzzMaxContext is the context limit under fuzzing: small, so that the fuzzer reaches it.
const fuzzMaxContext = 256

// outsidePlaceholder in a scripted name or link target becomes the absolute path of a
// directory beside the context, which the fuzzer cannot know: escapes by absolute path are
// then as reachable as escapes through "../outside".
const outsidePlaceholder = "@OUT@"

// ctxEntry is one scripted tar entry. A declared size above len(data) ends the archive
// there: the entry claims bytes the stream then supplies from the raw tail, or not at all.
type ctxEntry struct {
	typ        byte
	name, link string
	mode       int64
	data       []byte
	extraSize  uint64
}

// script encodes entries in the form FuzzExtractContext decodes, for the seed corpus.
func script(entries ...ctxEntry) []byte {
	var b []byte
	for _, e := range entries {
		b = append(b, e.typ)
		b = binary.AppendUvarint(b, uint64(len(e.name)))
		b = append(b, e.name...)
		b = binary.AppendUvarint(b, uint64(len(e.link)))
		b = append(b, e.link...)
		b = binary.AppendUvarint(b, uint64(e.mode))
		b = binary.AppendUvarint(b, uint64(len(e.data)))
		b = append(b, e.data...)
		b = binary.AppendUvarint(b, e.extraSize)
	}
	return b
}

// parseScript decodes as many whole entries as s holds.
func parseScript(s []byte) []ctxEntry {
	var out []ctxEntry
	field := func() ([]byte, bool) {
		n, k := binary.Uvarint(s)
		if k <= 0 || n > uint64(len(s)-k) {
			return nil, false
		}
		v := s[k : k+int(n)]
		s = s[k+int(n):]
		return v, true
	}
	number := func() (uint64, bool) {
		n, k := binary.Uvarint(s)
		if k <= 0 {
			return 0, false
		}
		s = s[k:]
		return n, true
	}
	for len(s) > 0 {
		var e ctxEntry
		var ok bool
		var name, link []byte
		e.typ, s = s[0], s[1:]
		if name, ok = field(); !ok {
			break
		}
		if link, ok = field(); !ok {
			break
		}
		mode, ok := number()
		if !ok {
			break
		}
		if e.data, ok = field(); !ok {
			break
		}
		if e.extraSize, ok = number(); !ok {
			break
		}
		e.name, e.link, e.mode = string(name), string(link), int64(mode&0o7777777)
		out = append(out, e)
	}
	return out
}

// buildTar writes entries as a tar stream, then tail as raw bytes: with no tail, the
// archive ends properly; with one, the tail is read as whatever comes next (more headers,
// the rest of a short entry, garbage).
func buildTar(entries []ctxEntry, outside string, tail []byte) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		hdr := &tar.Header{
			Typeflag: e.typ,
			Name:     strings.ReplaceAll(e.name, outsidePlaceholder, outside),
			Linkname: strings.ReplaceAll(e.link, outsidePlaceholder, outside),
			Mode:     e.mode,
			Size:     int64(len(e.data)),
		}
		short := e.extraSize > 0 && e.extraSize < 1<<63-uint64(len(e.data))
		if short {
			hdr.Size += int64(e.extraSize)
		}
		if tw.WriteHeader(hdr) != nil {
			break
		}
		if len(e.data) > 0 {
			if _, err := tw.Write(e.data); err != nil {
				break
			}
		}
		if short {
			return append(buf.Bytes(), tail...)
		}
	}
	if len(tail) == 0 {
		tw.Close()
		return buf.Bytes()
	}
	tw.Flush()
	return append(buf.Bytes(), tail...)
}

// snapshot lists every path under dir, except skip and below, with its mode and, for files, content.
func snapshot(t *testing.T, dir, skip string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Fatalf("walking %s: %v", dir, err)
		}
		if p == skip {
			return filepath.SkipDir
		}
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		v := fi.Mode().String()
		if fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			v += " " + string(b)
		}
		out[p] = v
		return nil
	})
	return out
}

// Whatever tar a caller uploads, extraction writes only inside the context directory,
// only files, directories and symlinks, no special mode bits, no more than the limit, and
// refuses what it does not take with an invalid-argument error, never a panic.
func FuzzExtractContext(f *testing.F) {
	reg := func(name, data string) ctxEntry {
		return ctxEntry{typ: tar.TypeReg, name: name, mode: 0o644, data: []byte(data)}
	}
	dir := func(name string) ctxEntry { return ctxEntry{typ: tar.TypeDir, name: name, mode: 0o755} }
	sym := func(name, link string) ctxEntry { return ctxEntry{typ: tar.TypeSymlink, name: name, link: link} }
	seeds := [][]ctxEntry{
		{reg("Dockerfile", "FROM localhost/busybox:1\n"), dir("src/"), reg("src/main.go", "package main\n")},
		{reg("./a", "x"), dir("./"), dir(".")},
		// Traversal and absolute names.
		{reg("../escaped", "owned")},
		{reg("a/../../escaped", "owned")},
		{reg("/etc/kiln-fuzz", "owned")},
		{reg(outsidePlaceholder+"/planted", "owned")},
		{dir("../outside/new/")},
		{reg("..", "x"), reg("...", "x"), reg("..a", "x")},
		// Symlinks, then writes through them: relative, absolute, chained, dangling.
		{sym("l", "../outside"), reg("l/planted", "owned")},
		{sym("l", outsidePlaceholder), reg("l/planted", "owned")},
		{sym("l", outsidePlaceholder+"/secret"), reg("l", "owned")},
		{sym("l", outsidePlaceholder+"/missing"), reg("l", "owned")},
		{sym("a", "b"), sym("b", "c"), sym("c", "../outside"), reg("a/planted", "owned")},
		{sym("l", outsidePlaceholder), dir("l/"), dir("l/sub/")},
		{sym("l", "."), sym("l/m", "../outside"), reg("l/m/planted", "owned")},
		{dir("d/"), sym("d", outsidePlaceholder), reg("d/planted", "owned")},
		{sym("l", outsidePlaceholder), sym("l", outsidePlaceholder)},
		// Kinds the context does not take.
		{{typ: tar.TypeLink, name: "h", link: outsidePlaceholder + "/secret"}},
		{{typ: tar.TypeLink, name: "h", link: "/etc/shadow"}},
		{{typ: tar.TypeChar, name: "null"}},
		{{typ: tar.TypeFifo, name: "fifo"}},
		{{typ: tar.TypeGNUSparse, name: "sparse"}},
		// Modes: setuid, setgid and sticky never land; a file with no permissions still extracts.
		{{typ: tar.TypeReg, name: "suid", mode: 0o7777, data: []byte("#!/bin/sh\n")}},
		{{typ: tar.TypeReg, name: "none", mode: 0, data: []byte("x")}},
		// Sizes: at, over, and a header claiming far more than the stream holds, after a
		// first file, so that a sum of sizes can overflow.
		{reg("a", strings.Repeat("x", fuzzMaxContext))},
		{reg("a", strings.Repeat("x", fuzzMaxContext)), reg("b", "y")},
		{reg("a", "x"), {typ: tar.TypeReg, name: "b", mode: 0o644, extraSize: 1 << 40}},
		// Names: invalid UTF-8, control characters, long components and paths.
		{reg("bad\xff\xfe", "x"), reg("nl\nname", "x"), reg("tab\tname\x01", "x")},
		{reg(strings.Repeat("n", 300), "x")},
		{reg(strings.Repeat(strings.Repeat("d", 250)+"/", 17)+"f", "x")},
		// The same name as a file, a directory and a symlink in turn.
		{reg("same", "x"), dir("same/"), sym("same", "x")},
		{dir("same/"), reg("same", "x")},
	}
	for _, s := range seeds {
		f.Add(script(s...), []byte(nil))
	}
	// Raw tails: garbage after a valid entry, a truncated header, and a block of zeros.
	f.Add(script(reg("a", "x")), []byte("not a tar header"))
	f.Add([]byte(nil), bytes.Repeat([]byte{0}, 512))
	f.Add([]byte(nil), []byte("ustar\x0000"))
	// A size that overflows the running total once added to it, followed by more bytes
	// than the limit: the limit must still hold.
	f.Add(script(reg("a", "x"), ctxEntry{typ: tar.TypeReg, name: "b", mode: 0o644, extraSize: 1<<63 - 1}), bytes.Repeat([]byte("y"), 2*fuzzMaxContext))

	f.Fuzz(func(t *testing.T, spec, tail []byte) {
		// The context sits a few levels down so that a name climbing out with .. lands
		// in root, which is watched, beside a directory an absolute name can reach.
		root := t.TempDir()
		ctxDir := filepath.Join(root, "1", "2", "3", "4", "ctx")
		outside := filepath.Join(root, "outside")
		for _, d := range []string{ctxDir, filepath.Join(outside, "d")} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(outside, "secret"), []byte("secret"), 0o600); err != nil {
			t.Fatal(err)
		}
		before := snapshot(t, root, ctxDir)

		stream := buildTar(parseScript(spec), outside, tail)
		n, err := buildcontext.Extract(bytes.NewReader(stream), ctxDir, fuzzMaxContext)

		if err != nil && !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("error is not classified invalid (the API would answer 500 to a caller's bad tar): %v", err)
		}
		if n > fuzzMaxContext {
			t.Errorf("extracted %d bytes, over the %d-byte limit", n, fuzzMaxContext)
		}
		after := snapshot(t, root, ctxDir)
		for p, v := range after {
			if before[p] != v {
				t.Errorf("outside the context: %s is now %q, was %q", p, v, before[p])
			}
		}
		for p := range before {
			if _, ok := after[p]; !ok {
				t.Errorf("outside the context: %s was removed", p)
			}
		}
		var total int64
		filepath.WalkDir(ctxDir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				t.Fatalf("walking the context: %v", err)
			}
			fi, err := os.Lstat(p)
			if err != nil {
				t.Fatal(err)
			}
			m := fi.Mode()
			switch {
			case m.IsRegular():
				total += fi.Size()
			case m.IsDir(), m&fs.ModeSymlink != 0:
			default:
				t.Errorf("%s: extracted a %v", p, m.Type())
			}
			if m&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky) != 0 {
				t.Errorf("%s: extracted with mode %v", p, m)
			}
			return nil
		})
		if total > fuzzMaxContext {
			t.Errorf("the context holds %d bytes of files, over the %d-byte limit", total, fuzzMaxContext)
		}
	})
}
