package assets

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/cavaliergopher/cpio"

	"github.com/kilnhq/kiln/internal/atomicfile"
)

// WriteInitramfs writes a newc cpio archive with kiln-init as /init and the given
// modules under /lib/modules, with /lib/modules/kiln.order listing them in load order.
func WriteInitramfs(dst, initBin, modDir string, modules []string) error {
	out, err := atomicfile.Create(dst, 0o644)
	if err != nil {
		return err
	}
	defer out.Abort()
	w := cpio.NewWriter(out)
	dir := func(name string) error {
		return w.WriteHeader(&cpio.Header{Name: name, Mode: cpio.TypeDir | 0o755})
	}
	file := func(name string, mode cpio.FileMode, src string) error {
		f, err := os.Open(src)
		if err != nil {
			return err
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return err
		}
		if err := w.WriteHeader(&cpio.Header{Name: name, Mode: cpio.TypeReg | mode, Size: fi.Size()}); err != nil {
			return err
		}
		_, err = io.Copy(w, f)
		return err
	}
	for _, d := range []string{"dev", "proc", "sys", "mnt", "lib", "lib/modules"} {
		if err := dir(d); err != nil {
			return err
		}
	}
	if err := file("init", 0o755, initBin); err != nil {
		return fmt.Errorf("adding kiln-init: %w", err)
	}
	made := map[string]bool{"lib/modules": true}
	for _, m := range modules {
		name := filepath.Join("lib/modules", m)
		// Parent directories first, as the kernel's unpacker wants.
		parts := strings.Split(filepath.Dir(name), "/")
		for i := range parts {
			d := strings.Join(parts[:i+1], "/")
			if !made[d] {
				made[d] = true
				if err := dir(d); err != nil {
					return err
				}
			}
		}
		if err := file(name, 0o644, filepath.Join(modDir, m)); err != nil {
			return fmt.Errorf("adding module %s: %w", m, err)
		}
	}
	order := strings.Join(modules, "\n") + "\n"
	if err := w.WriteHeader(&cpio.Header{Name: "lib/modules/kiln.order", Mode: cpio.TypeReg | 0o644, Size: int64(len(order))}); err != nil {
		return err
	}
	if _, err := io.WriteString(w, order); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return out.Commit()
}
