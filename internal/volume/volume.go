// Package volume manages ext4 disk image files: create, inspect, extend, delete, and the
// attach lock that keeps a disk in one VM at a time. Images are made with e2fsprogs
// (mkfs.ext4 -d fills one from a directory without mounting it); no pure-Go ext4 writer
// is mature enough to trust with users' data.
package volume

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Info describes an ext4 image.
type Info struct {
	UUID string
	// Total and Used are the filesystem's size and used bytes as its superblock says;
	// the kernel refreshes the free count when the filesystem is synced or unmounted.
	Total int64
	Used  int64
	// FileSize is the image file's apparent size.
	FileSize int64
}

// MinSize is the smallest image mkfs.ext4 makes reliably with a journal.
const MinSize = 8 << 20

// Inspect reads an image's ext4 superblock. A file that is not ext4 is ErrInvalid.
func Inspect(path string) (Info, error) {
	f, err := os.Open(path)
	if err != nil {
		if os.IsNotExist(err) {
			return Info{}, errdefs.New(errdefs.ErrNotFound, "disk image %s does not exist: create one with `kiln disk create %s --size 1G`", path, path)
		}
		return Info{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return Info{}, err
	}
	if !fi.Mode().IsRegular() {
		return Info{}, errdefs.Invalid("%s is not a regular file: a disk must be an ext4 image file", path)
	}
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, 1024); err != nil && err != io.EOF {
		return Info{}, err
	}
	le := binary.LittleEndian
	if le.Uint16(sb[0x38:]) != 0xEF53 {
		return Info{}, errdefs.Invalid("%s is not an ext4 image (no ext4 superblock): create one with `kiln disk create`", path)
	}
	blockSize := int64(1024) << le.Uint32(sb[0x18:])
	blocks := int64(le.Uint32(sb[0x04:]))
	free := int64(le.Uint32(sb[0x0C:]))
	const incompat64bit = 0x80
	if le.Uint32(sb[0x60:])&incompat64bit != 0 {
		blocks |= int64(le.Uint32(sb[0x150:])) << 32
		free |= int64(le.Uint32(sb[0x158:])) << 32
	}
	u := sb[0x68:0x78]
	return Info{
		UUID:     fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16]),
		Total:    blocks * blockSize,
		Used:     (blocks - free) * blockSize,
		FileSize: fi.Size(),
	}, nil
}

func mkfsPath() (string, error) {
	p, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		for _, c := range []string{"/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"} {
			if _, err := os.Stat(c); err == nil {
				return c, nil
			}
		}
		return "", errdefs.Missing("mkfs.ext4", "e2fsprogs")
	}
	return p, nil
}

func tool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin/", "/sbin/"} {
		if _, err := os.Stat(d + name); err == nil {
			return d + name, nil
		}
	}
	return "", errdefs.Missing(name, "e2fsprogs")
}

func run(ctx context.Context, name string, args ...string) error {
	p, err := tool(name)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, p, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}

// Create makes a new ext4 image of size bytes at path, filled from dir if dir is set.
// The file is sparse: it takes disk space only as the guest writes.
func Create(ctx context.Context, path string, size int64, dir string) error {
	if size < MinSize {
		return errdefs.Invalid("disk size %d bytes is below the minimum of %d MiB", size, MinSize>>20)
	}
	if _, err := os.Stat(path); err == nil {
		return errdefs.New(errdefs.ErrConflict, "%s already exists: delete it first or choose another path", path)
	}
	if _, err := tool("mkfs.ext4"); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	f.Close()
	if err == nil {
		args := []string{"-q", "-F", "-E", "root_owner=0:0", "-m", "0"}
		if dir != "" {
			args = append(args, "-d", dir)
		}
		err = run(ctx, "mkfs.ext4", append(args, path)...)
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("creating disk %s: %w", path, err)
	}
	return nil
}

// Extend grows an unattached image to size bytes. The caller holds its attach lock.
func Extend(ctx context.Context, path string, size int64) error {
	info, err := Inspect(path)
	if err != nil {
		return err
	}
	if size <= info.FileSize {
		return errdefs.Invalid("new size %d bytes is not larger than the current %d bytes: disks only grow", size, info.FileSize)
	}
	if err := os.Truncate(path, size); err != nil {
		return fmt.Errorf("extending %s: %w", path, err)
	}
	return Grow(ctx, path)
}

// Grow extends an unattached image's filesystem to fill its file, after the file was
// made larger while the image was in use.
func Grow(ctx context.Context, path string) error {
	// resize2fs insists on a freshly checked filesystem when offline.
	if err := run(ctx, "e2fsck", "-f", "-p", path); err != nil {
		return fmt.Errorf("checking %s before resize: %w", path, err)
	}
	if err := run(ctx, "resize2fs", path); err != nil {
		return fmt.Errorf("resizing %s: %w", path, err)
	}
	return nil
}

// Delete removes an unattached image. The caller holds its attach lock.
func Delete(path string) error {
	if _, err := Inspect(path); err != nil {
		return err
	}
	return os.Remove(path)
}
