package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Limits bound what one image may make kiln read and write. Images come from tenants:
// every count here is checked while the layers stream, before the bytes they describe
// are written anywhere.
type Limits struct {
	// MaxBytes caps the uncompressed size: the bytes read from all layers, and the
	// sum of the sizes of the files that end up in the root filesystem (a sparse file
	// counts at its full size, because the ext4 writer stores it whole).
	MaxBytes int64
	// MaxEntries caps the tar entries read across all layers.
	MaxEntries int
	// MaxPathLen caps an entry's path (and a link's target) in bytes.
	MaxPathLen int
}

// Defaults for Limits; the server's flags override MaxBytes.
const (
	DefaultMaxBytes   = 10 << 30
	DefaultMaxEntries = 1_000_000
	DefaultMaxPathLen = 4096
	maxNameLen        = 255     // one path element, as ext4 stores it
	maxUserFileSize   = 1 << 20 // /etc/passwd or /etc/group kept to resolve the image's user
)

func (l Limits) withDefaults() Limits {
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	if l.MaxPathLen <= 0 {
		l.MaxPathLen = DefaultMaxPathLen
	}
	return l
}

// seen is what the merged view already holds at a path.
type seen uint8

const (
	seenImplied seen = iota + 1 // a directory made only because something lies below it
	seenDir
	seenOther // a file, link or device: it hides whatever lower layers have under it
)

// flattener merges an image's layers into one tar stream, the way an overlay mount
// would show them, without touching any filesystem: layers are read from the top down,
// and the first (uppermost) entry at a path wins. Whiteouts and opaque directories
// hide what lies below them in lower layers; a file in an upper layer hides a
// directory tree at its path in lower ones.
//
// Unlike go-containerregistry's mutate.Extract, it validates each entry (whiteouts
// naming ".", ".." or nothing, climbing paths, lengths), bounds bytes and entries as it
// streams, hides lower trees under an upper non-directory, and orders hard links after
// their targets, which tar2ext4 needs.
type flattener struct {
	lim     Limits
	out     *tar.Writer
	emitted map[string]seen
	hidden  map[string]bool // whited-out paths, with everything under them
	opaque  map[string]bool // directories whose lower contents are hidden
	links   []*tar.Header   // hard links whose target comes from a lower layer

	entries   int
	readBytes int64 // uncompressed bytes read from layers
	fileBytes int64 // sizes of files written out
	files     map[string]*bytes.Buffer
}

func newFlattener(out io.Writer, lim Limits) *flattener {
	return &flattener{
		lim:     lim.withDefaults(),
		out:     tar.NewWriter(out),
		emitted: map[string]seen{},
		hidden:  map[string]bool{},
		opaque:  map[string]bool{},
		files:   map[string]*bytes.Buffer{"etc/passwd": nil, "etc/group": nil},
	}
}

// layerError names the layer an error came from, keeping its kind.
func layerError(i int, err error) error {
	return fmt.Errorf("image layer %d: %w", i, err)
}

// flatten writes img's merged root filesystem as one tar stream.
func (f *flattener) flatten(ctx context.Context, layers []v1.Layer) error {
	for i := len(layers) - 1; i >= 0; i-- {
		rc, err := layers[i].Uncompressed()
		if err != nil {
			return layerError(i, err)
		}
		err = f.layer(ctx, &countingReader{r: rc, n: &f.readBytes, max: f.lim.MaxBytes}, i)
		rc.Close()
		if err != nil {
			return layerError(i, err)
		}
	}
	for _, h := range f.links {
		target := cleanName(h.Linkname)
		if f.emitted[target] != seenOther {
			return errdefs.Invalid("image entry %q is a hard link to %q, which is not a file in the image: rebuild the image", h.Name, h.Linkname)
		}
		if err := f.out.WriteHeader(h); err != nil {
			return err
		}
	}
	return f.out.Close()
}

// layer merges one layer under what upper layers already wrote.
func (f *flattener) layer(ctx context.Context, r io.Reader, index int) error {
	tr := tar.NewReader(r)
	// A layer's whiteouts apply to the layers below it, not to its own entries.
	hide, opaque := map[string]bool{}, map[string]bool{}
	// Symbolic links this layer made. A later entry of the same layer below one of them
	// lands at the link's target, as when a runtime applies the layer to a directory;
	// links of upper layers hide what is below them instead.
	symlinks := map[string]string{}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			var tooBig *tooBigError
			if errors.As(err, &tooBig) {
				return err
			}
			return errdefs.Invalid("reading the layer's tar stream: %v: rebuild or re-export the image", err)
		}
		if f.entries++; f.entries > f.lim.MaxEntries {
			return errdefs.Invalid("the image has more than %d entries across its layers, the limit: remove files or split the image", f.lim.MaxEntries)
		}
		name, err := f.checkName(hdr.Name)
		if err != nil {
			return err
		}
		if name, err = resolveParents(name, symlinks); err != nil {
			return err
		}
		if hdr.Typeflag == tar.TypeSymlink {
			symlinks[name] = hdr.Linkname
		}
		dir, base := path.Split(name)
		dir = strings.TrimSuffix(dir, "/")
		if dir == "" {
			dir = "."
		}
		if victim, ok := strings.CutPrefix(base, ".wh."); ok {
			switch {
			case victim == ".wh..opq":
				opaque[dir] = true
			case strings.HasPrefix(victim, ".wh."):
				// aufs bookkeeping (.wh..wh.plnk and friends): nothing to merge.
			case victim == "" || victim == "." || victim == "..":
				return errdefs.Invalid("image entry %q is a whiteout that names %q, which is not a file: rebuild the image", hdr.Name, victim)
			default:
				hide[path.Join(dir, victim)] = true
			}
			continue
		}
		if f.hiddenBelow(name) {
			continue
		}
		if hdr.Typeflag == tar.TypeLink {
			target, err := f.checkName(hdr.Linkname)
			if err != nil {
				return err
			}
			if hdr.Linkname, err = resolveParents(target, symlinks); err != nil {
				return err
			}
		}
		if err := f.entry(tr, hdr, name, index); err != nil {
			return err
		}
	}
	for p := range hide {
		f.hidden[p] = true
	}
	for p := range opaque {
		f.opaque[p] = true
	}
	return nil
}

// checkName cleans an entry's name and refuses names no legitimate image has.
func (f *flattener) checkName(raw string) (string, error) {
	if len(raw) > f.lim.MaxPathLen {
		return "", errdefs.Invalid("image entry %.64q... has a %d-byte path, over the limit of %d", raw, len(raw), f.lim.MaxPathLen)
	}
	if strings.IndexByte(raw, 0) >= 0 {
		return "", errdefs.Invalid("image entry %q has a NUL byte in its path", raw)
	}
	for _, el := range strings.Split(raw, "/") {
		if el == ".." {
			return "", errdefs.Invalid("image entry %q climbs out of the image with \"..\": rebuild the image", raw)
		}
		if len(el) > maxNameLen {
			return "", errdefs.Invalid("image entry %q has a path element of %d bytes, over ext4's %d", raw, len(el), maxNameLen)
		}
	}
	return cleanName(raw), nil
}

// cleanName is a path inside the image, relative to its root: "/a/./b/" is "a/b", and
// the root itself is ".".
func cleanName(name string) string {
	p := path.Clean("/" + name)
	if p == "/" {
		return "."
	}
	return p[1:]
}

// hiddenBelow reports whether upper layers already decided what is at name: they wrote
// it, whited it out, made an ancestor opaque, or put a non-directory at an ancestor.
func (f *flattener) hiddenBelow(name string) bool {
	if f.hidden[name] {
		return true
	}
	for p := name; p != "."; {
		p = path.Dir(p)
		if f.hidden[p] || f.opaque[p] || f.emitted[p] == seenOther {
			return true
		}
	}
	return false
}

// entry writes one entry that no upper layer hides.
func (f *flattener) entry(tr *tar.Reader, hdr *tar.Header, name string, index int) error {
	isDir := hdr.Typeflag == tar.TypeDir
	switch f.emitted[name] {
	case seenDir, seenOther:
		return nil // an upper layer, or an earlier entry of this layer, has it
	case seenImplied:
		if hdr.Typeflag == tar.TypeSymlink {
			// An upper layer wrote below this path as if it were a directory, through a
			// link it could only follow once applied; those files are already written.
			return errdefs.Invalid("layer %d makes %q a symbolic link, but a later layer writes files below %q as if through it: kiln does not follow links across layers; rebuild the image so those files are written at the link's target", index, hdr.Name, name)
		}
		if !isDir {
			return nil // an upper layer has a directory here
		}
	}
	out := &tar.Header{
		Name: name, Mode: hdr.Mode & 0o7777, Uid: hdr.Uid, Gid: hdr.Gid,
		ModTime: hdr.ModTime, AccessTime: hdr.AccessTime, ChangeTime: hdr.ChangeTime,
		Format: tar.FormatPAX,
	}
	for k, v := range hdr.PAXRecords {
		if strings.HasPrefix(k, "SCHILY.xattr.") {
			if out.PAXRecords == nil {
				out.PAXRecords = map[string]string{}
			}
			out.PAXRecords[k] = v
		}
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		out.Typeflag = tar.TypeDir
		if name == "." {
			out.Name = "./"
		}
	case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse:
		// The reader expands a sparse file's holes; Size is its logical size.
		if hdr.Size < 0 || hdr.Size > f.lim.MaxBytes-f.fileBytes {
			return &tooBigError{f.lim.MaxBytes, fmt.Sprintf("file %q of %d bytes", hdr.Name, hdr.Size)}
		}
		f.fileBytes += hdr.Size
		out.Typeflag, out.Size = tar.TypeReg, hdr.Size
	case tar.TypeSymlink:
		if len(hdr.Linkname) > f.lim.MaxPathLen || hdr.Linkname == "" {
			return errdefs.Invalid("image entry %q is a symbolic link with a target of %d bytes: it must be 1 to %d", hdr.Name, len(hdr.Linkname), f.lim.MaxPathLen)
		}
		// The target means something only inside the guest; it is stored, never followed.
		out.Typeflag, out.Linkname = tar.TypeSymlink, hdr.Linkname
	case tar.TypeLink:
		target, err := f.checkName(hdr.Linkname)
		if err != nil {
			return err
		}
		if target == "." || target == name {
			return errdefs.Invalid("image entry %q is a hard link to %q, which is not a file", hdr.Name, hdr.Linkname)
		}
		out.Typeflag, out.Linkname, out.Mode = tar.TypeLink, target, 0
		f.markParents(name)
		f.emitted[name] = seenOther
		if f.emitted[target] != seenOther {
			// Its target is in a lower layer (or later in this one): link at the end.
			if len(f.links) >= f.lim.MaxEntries {
				return errdefs.Invalid("the image has more than %d hard links", f.lim.MaxEntries)
			}
			f.links = append(f.links, out)
			return nil
		}
		return f.out.WriteHeader(out)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		// A device node is an inode in the guest's filesystem; the host never makes one.
		out.Typeflag, out.Devmajor, out.Devminor = hdr.Typeflag, hdr.Devmajor, hdr.Devminor
	default:
		return nil // sockets, GNU volume headers and the like carry nothing to keep
	}
	f.markParents(name)
	if isDir {
		f.emitted[name] = seenDir
	} else {
		f.emitted[name] = seenOther
	}
	if err := f.out.WriteHeader(out); err != nil {
		return err
	}
	if out.Typeflag != tar.TypeReg {
		return nil
	}
	var src io.Reader = tr
	if buf, want := f.files[name]; want && buf == nil && hdr.Size <= maxUserFileSize {
		buf = &bytes.Buffer{}
		f.files[name] = buf
		src = io.TeeReader(tr, buf)
	}
	_, err := io.Copy(f.out, src)
	return err
}

// resolveParents follows the symbolic links in links along name's parent directories,
// inside the image: an absolute target starts again at the image's root, and ".."
// never climbs above it. The last element is not followed.
func resolveParents(name string, links map[string]string) (string, error) {
	if len(links) == 0 || name == "." {
		return name, nil
	}
	dir, base := path.Split(name)
	parts := strings.Split(dir, "/")
	cur := "."
	for hops := 0; len(parts) > 0; {
		el := parts[0]
		parts = parts[1:]
		switch el {
		case "", ".":
			continue
		case "..":
			cur = path.Dir(cur)
			continue
		}
		next := path.Join(cur, el)
		target, ok := links[next]
		if !ok {
			cur = next
			continue
		}
		if hops++; hops > 40 {
			return "", errdefs.Invalid("image entry %q: too many levels of symbolic links", name)
		}
		if path.IsAbs(target) {
			cur = "."
		}
		parts = append(strings.Split(target, "/"), parts...)
	}
	return cleanName(path.Join(cur, base)), nil
}

// markParents records name's ancestors as directories, so a lower layer's file cannot
// take a path that the merged view already uses as a directory.
func (f *flattener) markParents(name string) {
	for p := path.Dir(name); p != "."; p = path.Dir(p) {
		if _, ok := f.emitted[p]; ok {
			return
		}
		f.emitted[p] = seenImplied
	}
}

// file returns the content of a small file the flattener kept (etc/passwd, etc/group).
func (f *flattener) file(name string) ([]byte, bool) {
	buf := f.files[name]
	if buf == nil {
		return nil, false
	}
	return buf.Bytes(), true
}

// tooBigError is an image over Limits.MaxBytes.
type tooBigError struct {
	max  int64
	what string
}

func (e *tooBigError) Error() string {
	return fmt.Sprintf("the image is larger than the limit of %d bytes uncompressed (%s): raise `kiln server --image-max-size` if the image is genuine", e.max, e.what)
}

func (e *tooBigError) Is(target error) bool { return target == errdefs.ErrInvalid }

// countingReader fails once more than max bytes have passed through it, so a gzip bomb
// stops at the cap instead of filling the disk.
type countingReader struct {
	r   io.Reader
	n   *int64
	max int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	*c.n += int64(n)
	if *c.n > c.max {
		return n, &tooBigError{c.max, "reading its layers"}
	}
	return n, err
}
