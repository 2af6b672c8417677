package assets_test

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cavaliergopher/cpio"

	"github.com/kilnhq/kiln/internal/assets"
)

func TestResolveModules(t *testing.T) {
	got, err := assets.ResolveModules("testdata/modules", []string{"virtio_blk", "ext4", "overlay", "virtio_mmio"})
	if err != nil {
		t.Fatal(err)
	}
	pos := func(name string) int {
		return slices.IndexFunc(got, func(p string) bool { return strings.HasSuffix(p, "/"+name+".ko") })
	}
	for _, m := range []string{"virtio_ring", "virtio", "virtio_blk", "crc16", "mbcache", "jbd2", "ext4", "virtio_mmio"} {
		if pos(m) < 0 {
			t.Errorf("%s missing from %v", m, got)
		}
	}
	if !(pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_blk") && pos("jbd2") < pos("ext4")) {
		t.Errorf("dependencies not first: %v", got)
	}
	if len(got) != 8 {
		t.Errorf("want each module once and built-in overlay skipped, got %v", got)
	}
	if _, err := assets.ResolveModules("testdata/modules", []string{"nope"}); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Errorf("unknown module: %v", err)
	}
}

func TestWriteInitramfs(t *testing.T) {
	dir := t.TempDir()
	init := filepath.Join(dir, "kiln-init")
	os.WriteFile(init, []byte("#!init"), 0o755)
	mods := filepath.Join(dir, "mods")
	os.MkdirAll(filepath.Join(mods, "kernel/a"), 0o755)
	os.WriteFile(filepath.Join(mods, "kernel/a/x.ko"), []byte("module"), 0o644)
	out := filepath.Join(dir, "initramfs.cpio")
	if err := assets.WriteInitramfs(out, init, mods, []string{"kernel/a/x.ko"}); err != nil {
		t.Fatal(err)
	}
	f, _ := os.Open(out)
	defer f.Close()
	r := cpio.NewReader(f)
	files := map[string]string{}
	for {
		h, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(r)
		files[h.Name] = string(b)
		if h.Name == "init" && h.Mode.Perm() != 0o755 {
			t.Errorf("init mode %v", h.Mode)
		}
	}
	if files["init"] != "#!init" || files["lib/modules/kernel/a/x.ko"] != "module" || files["lib/modules/kiln.order"] != "kernel/a/x.ko\n" {
		t.Errorf("archive holds %v", files)
	}
}

func TestExtractVmlinux(t *testing.T) {
	xz, err := exec.LookPath("xz")
	if err != nil {
		t.Skip("xz not installed: run `make setup`")
	}
	// A stand-in bzImage: a header with a false XZ magic, then an XZ stream of an ELF.
	elf, _ := os.ReadFile("/bin/true")
	cmd := exec.Command(xz, "-c", "--x86", "--lzma2")
	cmd.Stdin = bytes.NewReader(elf)
	payload, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	img := append([]byte("MZ\xfd7zXZ\x00broken"), payload...)
	img = append(img, []byte("trailing data")...)
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "vmlinux")
	os.WriteFile(src, img, 0o644)
	if err := assets.ExtractVmlinux(src, dst); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(dst); !bytes.Equal(got, elf) || !assets.IsELF(dst) {
		t.Error("extracted kernel differs from the ELF compressed into it")
	}
	os.WriteFile(src, []byte("no kernel here"), 0o644)
	if err := assets.ExtractVmlinux(src, dst+"2"); err == nil || !strings.Contains(err.Error(), "--kernel") {
		t.Errorf("not a kernel: %v", err)
	}
}
