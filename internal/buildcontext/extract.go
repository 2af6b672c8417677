package buildcontext

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Extract unpacks an uploaded build context into dir, which must be empty. It is
// strict where an image layer is lenient, because the tar comes from a caller: an entry
// whose name leaves the context (absolute, or through ..) or passes through a symlink
// is refused, as is anything but files, directories and symlinks, and the whole is
// bounded by max bytes and MaxEntries entries. It returns the bytes written.
func Extract(r io.Reader, dir string, max int64) (int64, error) {
	tr := tar.NewReader(r)
	var total int64
	for entries := 0; ; entries++ {
		if entries >= MaxEntries {
			return total, errdefs.Invalid("the build context has more than %d entries: leave files out with .dockerignore", MaxEntries)
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, errdefs.Wrap(errdefs.ErrInvalid, err, "the build context is not a valid tar stream")
		}
		name := hdr.Name
		clean := path.Clean("/" + name)[1:]
		if path.IsAbs(name) || strings.HasPrefix(path.Clean(name), "..") || strings.Contains("/"+name+"/", "/../") {
			return total, errdefs.Invalid("the build context has an entry %q that points outside the context: refused", name)
		}
		if clean == "" {
			continue
		}
		p := filepath.Join(dir, filepath.FromSlash(clean))
		if err := noSymlinkParents(dir, clean); err != nil {
			return total, err
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return total, entryErr(name, err)
			}
		case tar.TypeReg:
			if hdr.Size > max-total { // not total+hdr.Size: a size near 2^63 would wrap it past the check
				return total, errdefs.Invalid("the build context is larger than the %d MiB limit: leave files out with .dockerignore, or raise the server's --build-max-context", max>>20)
			}
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return total, entryErr(name, err)
			}
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC|unix.O_NOFOLLOW, os.FileMode(hdr.Mode&0o777)|0o600)
			if err != nil {
				return total, entryErr(name, err)
			}
			n, err := io.Copy(f, io.LimitReader(tr, hdr.Size))
			total += n
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return total, entryErr(name, err)
			}
			os.Chmod(p, os.FileMode(hdr.Mode&0o777))
		case tar.TypeSymlink:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return total, entryErr(name, err)
			}
			if err := os.Symlink(hdr.Linkname, p); err != nil {
				return total, entryErr(name, err)
			}
		default:
			return total, errdefs.Invalid("the build context has an entry %q of a kind kiln does not take (type %q): send files, directories and symlinks", name, hdr.Typeflag)
		}
	}
}

// entryErr reports a failure to extract entry name by the entry, not by the host path it
// would have had. What the tar itself causes (a name used twice as different kinds, a name
// too long, a stream cut short) is the caller's to fix and so invalid; the host's own
// faults, such as a full disk, stay unclassified.
func entryErr(name string, err error) error {
	var errno unix.Errno
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, tar.ErrHeader):
		return errdefs.Invalid("the build context ends inside the entry %q: send the whole tar stream", name)
	case errors.As(err, &errno) && (errno == unix.EEXIST || errno == unix.ENOTDIR || errno == unix.EISDIR ||
		errno == unix.ELOOP || errno == unix.ENAMETOOLONG || errno == unix.EINVAL):
		return errdefs.Invalid("the build context entry %q cannot be extracted (%v): each path may be one file, directory or symlink, within the host's name limits", name, errno)
	}
	return fmt.Errorf("extracting the build context entry %q: %w", name, err)
}

// noSymlinkParents refuses a path whose parent directories include a symlink: writing
// through it could land outside the context.
func noSymlinkParents(dir, rel string) error {
	parts := strings.Split(rel, "/")
	cur := dir
	for _, part := range parts[:len(parts)-1] {
		cur = filepath.Join(cur, part)
		fi, err := os.Lstat(cur)
		if err != nil {
			return nil // not there yet: it will be created as a directory
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			return errdefs.Invalid("the build context has an entry %q below the symlink %q: refused", rel, strings.TrimPrefix(cur, dir+"/"))
		}
	}
	return nil
}
