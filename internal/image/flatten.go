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
	// MaxNameBytes caps the sum of the lengths of all paths in the merged image.
	MaxNameBytes int64
}

// Defaults for Limits; the server's flags override MaxBytes.
const (
	DefaultMaxBytes   = 10 << 30
	DefaultMaxEntries = 1_000_000
	DefaultMaxPathLen = 4096
	maxNameLen        = 255  // one path element, as ext4 stores it
	maxDepth          = 256  // directories in a path
	maxXattrBytes     = 4096 // an entry's extended attributes, names and values: what fits ext4's inode and block
	// DefaultMaxNameBytes caps the bytes of all paths the image holds, directories
	// included: the ext4 writer keeps every directory's path in memory.
	DefaultMaxNameBytes = 256 << 20
	maxUserFileSize     = 1 << 20 // /etc/passwd or /etc/group kept to resolve the image's user
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
	if l.MaxNameBytes <= 0 {
		l.MaxNameBytes = DefaultMaxNameBytes
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
	linked  map[string]bool // their names, until written

	entries   int
	nameBytes int64
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
		linked:  map[string]bool{},
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
		cr := &countingReader{r: rc, n: &f.readBytes, max: f.lim.MaxBytes}
		err = f.layer(ctx, cr, i)
		if err == nil {
			// The layer's digest is checked only once its blob is read to the end: a
			// blob that ends in something other than the tar's padding was not the
			// layer the manifest names (and the cache would file it under that name).
			_, err = io.Copy(io.Discard, cr)
		}
		if cerr := rc.Close(); err == nil && cerr != nil {
			err = cerr
		}
		if err != nil {
			var tooBig *tooBigError
			if !errors.As(err, &tooBig) && !errors.Is(err, errdefs.ErrInvalid) && ctx.Err() == nil {
				err = errdefs.Wrap(errdefs.ErrInvalid, err, "the layer does not match its digest or is not a valid tar stream")
			}
			return layerError(i, err)
		}
	}
	if err := f.writeLinks(); err != nil {
		return err
	}
	return f.out.Close()
}

// writeLinks writes the hard links whose targets came from lower layers, each after its
// target: a link may point at another deferred link.
func (f *flattener) writeLinks() error {
	pending := f.linked
	for len(f.links) > 0 {
		var later []*tar.Header
		for _, h := range f.links {
			switch {
			case pending[h.Linkname]:
				later = append(later, h)
				continue
			case f.emitted[h.Linkname] != seenOther:
				return errdefs.Invalid("image entry %q is a hard link to %q, which is not a file in the image: rebuild the image", h.Name, h.Linkname)
			}
			if err := f.out.WriteHeader(h); err != nil {
				return err
			}
			delete(pending, h.Name)
		}
		if len(later) == len(f.links) {
			return errdefs.Invalid("image entry %q is a hard link in a cycle of hard links: rebuild the image", later[0].Name)
		}
		f.links = later
	}
	return nil
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
			return errdefs.Wrap(errdefs.ErrInvalid, err, "reading the layer's tar stream (rebuild or re-export the image)")
		}
		if f.entries++; f.entries > f.lim.MaxEntries {
			return errdefs.Invalid("the image has more than %d entries across its layers, the limit: remove files or split the image", f.lim.MaxEntries)
		}
		name, err := f.checkName(hdr.Name)
		if err != nil {
			return err
		}
		if name, err = f.resolve(hdr.Name, name, symlinks); err != nil {
			return err
		}
		// Every entry's names count, kept or not: whiteouts and this layer's links are
		// held in memory until the layer ends.
		if err := f.count(name); err != nil {
			return err
		}
		if err := f.count(hdr.Linkname); err != nil {
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
			if hdr.Linkname, err = f.resolve(hdr.Linkname, target, symlinks); err != nil {
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
	els := strings.Split(raw, "/")
	if len(els) > maxDepth {
		return "", errdefs.Invalid("image entry %.64q... is %d directories deep, over the limit of %d", raw, len(els), maxDepth)
	}
	for _, el := range els {
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
	xattrBytes := 0
	for k, v := range hdr.PAXRecords {
		if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			// ext4 stores a name's length in one byte; all of them share one block.
			if xattrBytes += len(x) + len(v); len(x) == 0 || len(x) > maxNameLen || xattrBytes > maxXattrBytes {
				return errdefs.Invalid("image entry %q has extended attributes over ext4's limits (a name of 1 to %d bytes, %d bytes in all)", hdr.Name, maxNameLen, maxXattrBytes)
			}
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
		if len(hdr.Linkname) >= f.lim.MaxPathLen || hdr.Linkname == "" || strings.IndexByte(hdr.Linkname, 0) >= 0 {
			return errdefs.Invalid("image entry %q is a symbolic link with a target of %d bytes: it must be 1 to %d, without NUL", hdr.Name, len(hdr.Linkname), f.lim.MaxPathLen-1)
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
		if err := f.markParents(name); err != nil {
			return err
		}
		f.emitted[name] = seenOther
		if f.emitted[target] != seenOther || f.linked[target] {
			// Its target is in a lower layer (or later in this one), or is itself such
			// a link: link at the end.
			f.linked[name] = true
			if len(f.links) >= f.lim.MaxEntries {
				return errdefs.Invalid("the image has more than %d hard links", f.lim.MaxEntries)
			}
			f.links = append(f.links, out)
			return nil
		}
		return f.out.WriteHeader(out)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		// A device node is an inode in the guest's filesystem; the host never makes one.
		if hdr.Devmajor < 0 || hdr.Devmajor > 0xfff || hdr.Devminor < 0 || hdr.Devminor > 0xfffff {
			return errdefs.Invalid("image entry %q is a device %d:%d, outside Linux's device numbers (major up to 4095, minor up to 1048575)", hdr.Name, hdr.Devmajor, hdr.Devminor)
		}
		out.Typeflag, out.Devmajor, out.Devminor = hdr.Typeflag, hdr.Devmajor, hdr.Devminor
	default:
		return nil // sockets, GNU volume headers and the like carry nothing to keep
	}
	if err := f.markParents(name); err != nil {
		return err
	}
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

// resolve follows symlinks of this layer along name's parents and checks the result
// as it checks a name from the tar: a chain of links must not build a path that no
// entry could have named.
func (f *flattener) resolve(raw, name string, links map[string]string) (string, error) {
	if len(links) == 0 {
		return name, nil
	}
	resolved, err := resolveParents(name, links, f.lim.MaxPathLen)
	if err != nil {
		return "", err
	}
	if resolved == name {
		return name, nil
	}
	if _, err := f.checkName(resolved); err != nil {
		return "", errdefs.Wrap(errdefs.ErrInvalid, err, "image entry %q, through the symbolic links above it", raw)
	}
	return resolved, nil
}

// resolveParents follows the symbolic links in links along name's parent directories,
// inside the image: an absolute target starts again at the image's root, and ".."
// never climbs above it. The last element is not followed.
func resolveParents(name string, links map[string]string, maxLen int) (string, error) {
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
		if len(next) > maxLen {
			return "", errdefs.Invalid("image entry %q leads, through symbolic links, to a path over %d bytes", name, maxLen)
		}
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
//
// Every path the merged view gains counts against the entry and name caps, implied
// directories included: they cost the ext4 writer as much as named ones.
func (f *flattener) markParents(name string) error {
	for p := path.Dir(name); p != "."; p = path.Dir(p) {
		if _, ok := f.emitted[p]; ok {
			return nil
		}
		if f.entries++; f.entries > f.lim.MaxEntries {
			return errdefs.Invalid("the image has more than %d files and directories, the limit: remove files or split the image", f.lim.MaxEntries)
		}
		if err := f.count(p); err != nil {
			return err
		}
		f.emitted[p] = seenImplied
	}
	return nil
}

func (f *flattener) count(name string) error {
	if f.nameBytes += int64(len(name)); f.nameBytes > f.lim.MaxNameBytes {
		return errdefs.Invalid("the image's paths add up to more than %d bytes, the limit: remove files or shorten deep paths", f.lim.MaxNameBytes)
	}
	return nil
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
