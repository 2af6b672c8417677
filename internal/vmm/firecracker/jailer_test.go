package firecracker

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/vmm"
)

func TestJailerCommand(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"vmlinux", "initramfs.cpio", "root.ext4"} {
		os.WriteFile(filepath.Join(dir, f), []byte(f), 0o644)
	}
	j := &Jailer{Binary: "/bin/true", UID: os.Getuid(), GID: os.Getgid(), ChrootBase: filepath.Join(dir, "jail")}
	cfg := vmm.Config{ID: "vm1", Kernel: filepath.Join(dir, "vmlinux"), Initramfs: filepath.Join(dir, "initramfs.cpio"),
		Disks: []vmm.Disk{{Path: filepath.Join(dir, "root.ext4")}}}
	cmd, sock, err := j.command("/usr/bin/firecracker", cfg)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "jail", "firecracker", "vm1", "root")
	if sock != filepath.Join(root, "firecracker.sock") {
		t.Errorf("api socket %s", sock)
	}
	want := "--id vm1 --exec-file /usr/bin/firecracker --uid"
	if got := strings.Join(cmd.Args[1:], " "); !strings.HasPrefix(got, want) || !strings.HasSuffix(got, "--chroot-base-dir "+filepath.Join(dir, "jail")+" -- --api-sock /firecracker.sock") {
		t.Errorf("jailer args: %s", got)
	}
	for _, f := range []string{"vmlinux", "initramfs.cpio", "root.ext4"} {
		if b, err := os.ReadFile(filepath.Join(root, f)); err != nil || string(b) != f {
			t.Errorf("%s not linked into the jail: %v", f, err)
		}
	}
	if j.inside(cfg.Kernel) != "/vmlinux" {
		t.Errorf("inside = %s", j.inside(cfg.Kernel))
	}
}
