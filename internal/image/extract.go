package image

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// within joins name to root lexically, confining it: "../x" and "/x" both land at root/x.
func within(root, name string) (string, error) {
	p := filepath.Join(root, filepath.Clean("/"+name))
	if p != root && !strings.HasPrefix(p, root+string(filepath.Separator)) {
		return "", errdefs.Invalid("image entry %q points outside the root filesystem", name)
	}
	return p, nil
}

// resolve returns where name's parent directory really is under root, following
// symlinks as the guest would see them (an absolute target starts again at root), so
// that no symlink in an image can make extraction write outside root. The last element
// is not followed: it is what the entry creates or replaces.
func resolve(root, name string) (string, error) {
	clean := filepath.Clean("/" + name)
	if clean == "/" {
		return root, nil
	}
	dir, base := filepath.Split(clean)
	parts := strings.Split(strings.Trim(dir, "/"), "/")
	cur := "/"
	hops := 0
	for len(parts) > 0 {
		part := parts[0]
		parts = parts[1:]
		if part == "" || part == "." {
			continue
		}
		if part == ".." {
			cur = filepath.Dir(cur)
			continue
		}
		next := filepath.Join(cur, part)
		fi, err := os.Lstat(filepath.Join(root, next))
		if err == nil && fi.Mode()&os.ModeSymlink != 0 {
			if hops++; hops > 255 {
				return "", errdefs.Invalid("image entry %q: too many levels of symbolic links", name)
			}
			target, err := os.Readlink(filepath.Join(root, next))
			if err != nil {
				return "", err
			}
			if filepath.IsAbs(target) {
				cur = "/"
			}
			parts = append(strings.Split(strings.Trim(target, "/"), "/"), parts...)
			continue
		}
		cur = next
	}
	return filepath.Join(root, cur, base), nil
}

// ApplyLayer applies one layer's tar stream on top of root the way a container runtime
// does: whiteouts (.wh.NAME) delete what lower layers put there, an opaque marker
// (.wh..wh..opq) empties its directory, and everything else is created with its mode,
// owner, extended attributes and times; symlinks in lower layers are followed inside
// root, never out of it. It returns the bytes written.
func ApplyLayer(r io.Reader, root string) (int64, error) {
	tr := tar.NewReader(r)
	var total int64
	type dirMeta struct {
		path string
		hdr  *tar.Header
	}
	var dirs []dirMeta
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return total, fmt.Errorf("reading image layer: %w", err)
		}
		p, err := resolve(root, hdr.Name)
		if err != nil {
			return total, err
		}
		if p == root {
			dirs = append(dirs, dirMeta{p, hdr})
			continue
		}
		base := filepath.Base(p)
		if base == ".wh..wh..opq" {
			ents, _ := os.ReadDir(filepath.Dir(p))
			for _, e := range ents {
				os.RemoveAll(filepath.Join(filepath.Dir(p), e.Name()))
			}
			continue
		}
		if victim, ok := strings.CutPrefix(base, ".wh."); ok {
			os.RemoveAll(filepath.Join(filepath.Dir(p), victim))
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return total, err
		}
		// An entry replaces whatever lower layers had at its name, but a directory
		// merges with a directory.
		if fi, err := os.Lstat(p); err == nil && !(fi.IsDir() && hdr.Typeflag == tar.TypeDir) {
			os.RemoveAll(p)
		}
		mode := uint32(hdr.Mode & 0o7777)
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return total, err
			}
			dirs = append(dirs, dirMeta{p, hdr})
			continue
		case tar.TypeReg:
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC|unix.O_NOFOLLOW, 0o600)
			if err != nil {
				return total, err
			}
			n, err := io.Copy(f, tr)
			total += n
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return total, err
			}
		case tar.TypeSymlink:
			if err := os.Symlink(hdr.Linkname, p); err != nil {
				return total, err
			}
		case tar.TypeLink:
			target, err := resolve(root, hdr.Linkname)
			if err != nil {
				return total, err
			}
			if err := os.Link(target, p); err != nil {
				return total, errdefs.Invalid("image entry %s: hard link to %s: %v", hdr.Name, hdr.Linkname, err)
			}
			continue // a hard link shares its target's metadata
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			kind := map[byte]uint32{tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK, tar.TypeFifo: unix.S_IFIFO}[hdr.Typeflag]
			if err := unix.Mknod(p, kind|mode, int(unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor)))); err != nil {
				return total, fmt.Errorf("device node %s: %w", hdr.Name, err)
			}
		default:
			continue // nothing to write for other entry types
		}
		if err := setMeta(p, hdr); err != nil {
			return total, err
		}
	}
	// Directory modes last, deepest first, so a read-only directory does not stop its
	// own contents from being written.
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := setMeta(dirs[i].path, dirs[i].hdr); err != nil {
			return total, err
		}
	}
	return total, nil
}

func setMeta(p string, hdr *tar.Header) error {
	if err := os.Lchown(p, hdr.Uid, hdr.Gid); err != nil {
		return fmt.Errorf("owner of %s: %w", hdr.Name, err)
	}
	for k, v := range hdr.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if err := unix.Lsetxattr(p, name, []byte(v), 0); err != nil {
				return fmt.Errorf("xattr %s on %s: %w", name, hdr.Name, err)
			}
		}
	}
	if hdr.Typeflag == tar.TypeSymlink {
		return nil
	}
	// chmod after chown: chown clears setuid and setgid bits.
	if err := os.Chmod(p, os.FileMode(hdr.Mode&0o777)|modeBits(hdr.Mode)); err != nil {
		return err
	}
	return os.Chtimes(p, hdr.ModTime, hdr.ModTime)
}

func modeBits(m int64) os.FileMode {
	var b os.FileMode
	if m&0o4000 != 0 {
		b |= os.ModeSetuid
	}
	if m&0o2000 != 0 {
		b |= os.ModeSetgid
	}
	if m&0o1000 != 0 {
		b |= os.ModeSticky
	}
	return b
}
