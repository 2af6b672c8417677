// Package assets produces and caches the guest's boot assets: the kernel (an
// uncompressed ELF vmlinux), the initramfs (kiln-init plus the kernel modules it needs)
// and the default root filesystem (a minimal Debian as an ext4 image). Every asset is
// stored under the data dir by the content hash of its inputs, so a changed input makes a
// new asset and an unchanged one is never rebuilt.
package assets

import (
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// xzMagic starts the XZ payload inside a Debian bzImage.
var xzMagic = []byte{0xFD, '7', 'z', 'X', 'Z', 0x00}

// DebianKernel returns the newest /boot/vmlinuz-* and its kernel release.
func DebianKernel(bootDir string) (path, release string, err error) {
	matches, _ := filepath.Glob(filepath.Join(bootDir, "vmlinuz-*"))
	if len(matches) == 0 {
		return "", "", errdefs.Missing("guest kernel ("+bootDir+"/vmlinuz-*)", "linux-image-amd64")
	}
	sort.Strings(matches)
	path = matches[len(matches)-1]
	return path, strings.TrimPrefix(filepath.Base(path), "vmlinuz-"), nil
}

// IsELF reports whether path is an ELF executable, the form both QEMU's PVH entry and
// Firecracker boot.
func IsELF(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// hasSymbol reports whether the ELF kernel at path defines name. A kernel without a
// symbol table counts as having it.
func hasSymbol(path, name string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return true
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		return true
	}
	for _, s := range syms {
		if s.Name == name {
			return true
		}
	}
	return false
}

// ExtractVmlinux writes the uncompressed ELF kernel found inside the XZ-compressed
// bzImage src to dst. Booting the ELF directly skips the in-guest decompressor, which
// under software emulation costs seconds.
func ExtractVmlinux(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("reading kernel: %w", err)
	}
	for off := 0; ; {
		i := bytes.Index(b[off:], xzMagic)
		if i < 0 {
			return errdefs.Invalid("%s holds no XZ-compressed kernel that decompresses to an ELF vmlinux: pass an uncompressed vmlinux with --kernel", src)
		}
		off += i
		err := decompressTo(b[off:], dst)
		if err == nil {
			return nil
		}
		if errors.Is(err, errdefs.ErrMissingDependency) {
			return err
		}
		off++
	}
}

// decompressTo runs xz over payload. Debian compresses its kernel with the x86 BCJ
// filter, which pure-Go XZ readers lack, so this uses xz-utils. xz reports the bytes
// after the stream as corruption; the ELF check by the caller is what counts.
func decompressTo(payload []byte, dst string) error {
	xzBin, err := exec.LookPath("xz")
	if err != nil {
		return errdefs.Missing("xz", "xz-utils")
	}
	f, err := atomicfile.Create(dst, 0o644)
	if err != nil {
		return err
	}
	defer f.Abort()
	cmd := exec.Command(xzBin, "-dc")
	cmd.Stdin, cmd.Stdout = bytes.NewReader(payload), f.File
	runErr := cmd.Run()
	if !IsELF(f.Name()) {
		if runErr == nil {
			runErr = errors.New("not an ELF file")
		}
		return runErr
	}
	return f.Commit()
}

// hashFile returns the sha256 of a file's contents, hex-encoded.
func hashFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// hashStrings hashes a list of inputs into a short cache key.
func hashStrings(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		fmt.Fprintf(h, "%d:%s\n", len(p), p)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}
