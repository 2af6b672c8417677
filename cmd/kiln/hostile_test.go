package main_test

import (
	"archive/tar"
	"crypto/sha256"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/kilnhq/kiln/internal/image/imagetest"
)

// hostState is what an image could change about a host file.
type hostState struct {
	mode, uid, nlink uint32
	sum              [32]byte
}

func stateOf(t *testing.T, path string) hostState {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	return hostState{st.Mode, st.Uid, uint32(st.Nlink), sha256.Sum256(b)}
}

// Each hostile image goes through `kiln image load` and `kiln machine run`. For each the
// host is untouched, the guest sees the image as its author wrote it (or the run is
// refused, saying why), and nothing is left behind.
func TestHostileImagesEndToEnd(t *testing.T) {
	e := newEnv(t)
	srv := startServer(t, e, freeAddr(t), "--proxy-listen", "off", "--image-max-size", "64M")
	defer stopOnFailure(&srv)

	hostDir := t.TempDir()
	secret := filepath.Join(hostDir, "secret")
	if err := os.WriteFile(secret, []byte("host only\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	watched := map[string]hostState{secret: stateOf(t, secret), "/etc/shadow": stateOf(t, "/etc/shadow")}
	rootfsDir := filepath.Join(e.dataDir, "images", "rootfs")

	base := imagetest.Base(t)
	on := func(layers ...v1.Layer) v1.Image {
		img, err := mutate.AppendLayers(base, layers...)
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
	L := func(es ...imagetest.Entry) v1.Layer { return imagetest.Layer(t, es...) }
	type E = imagetest.Entry
	bb := imagetest.Busybox(t)

	cases := []struct {
		name    string
		img     v1.Image
		refused string // what the refusal says; empty when the machine runs
		guest   string // a shell command whose output the guest must print
		want    string
	}{{
		name:  "setuid dir then symlink to a host file",
		img:   on(L(E{Name: "p/", Type: tar.TypeDir, Mode: 0o4777}, E{Name: "p", Type: tar.TypeSymlink, Link: secret})),
		guest: "busybox stat -c '%a %F' /p", want: "4777 directory\n",
	}, {
		name: "whiteout of the root", img: on(L(E{Name: ".wh.."})), refused: `whiteout that names "."`,
	}, {
		name:  "device node",
		img:   on(L(E{Name: "devs/", Type: tar.TypeDir}, E{Name: "devs/mem", Type: tar.TypeChar, Mode: 0o600, Dev: [2]int64{1, 1}})),
		guest: "busybox stat -c '%t:%T %F %a' /devs/mem", want: "1:1 character special file 600\n",
	}, {
		name:  "setuid binary",
		img:   on(L(E{Name: "bin/suid", Mode: 0o4755, Body: bb})),
		guest: "busybox stat -c '%a %u' /bin/suid", want: "4755 0\n",
	}, {
		name: "20 GiB sparse file", img: on(imagetest.SparseLayer(t, 20<<30)), refused: "--image-max-size",
	}, {
		name: "gzip bomb", img: on(imagetest.GzipBomb(t, 256<<20)), refused: "--image-max-size",
	}, {
		name: "hard link to /etc/shadow",
		img: on(L(E{Name: "etc/shadow", Mode: 0o640, Body: []byte("root:image-only:\n")}),
			L(E{Name: "stolen", Type: tar.TypeLink, Link: "/etc/shadow"})),
		guest: "cat /stolen; busybox stat -c %h /stolen", want: "root:image-only:\n2\n",
	}, {
		name: "absolute symlink, then a file written through it",
		img: on(L(E{Name: "evil", Type: tar.TypeSymlink, Link: hostDir},
			E{Name: "evil/planted", Mode: 0o644, Body: []byte("planted\n")})),
		guest: "cat " + hostDir + "/planted", want: "planted\n",
	}}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ref := "localhost/hostile:" + string(rune('a'+i))
			loadImage(t, srv, c.img, ref)
			out, errs, code := srv.kiln("", "machine", "run", ref, "--app", "hostile", "--", "sleep", "100000")
			if c.refused != "" {
				if code == 0 || !strings.Contains(errs, c.refused) {
					t.Errorf("run: code %d, stderr %q; want a refusal saying %q", code, errs, c.refused)
				}
			} else {
				if code != 0 {
					t.Fatalf("run: %s\n%s", errs, srv.logs)
				}
				lines := strings.Split(strings.TrimSpace(out), "\n")
				id := lines[len(lines)-1]
				if _, errs, code := srv.kiln("", "machine", "wait", id, "--state", "started"); code != 0 {
					t.Fatalf("wait: %s", errs)
				}
				got, errs, code := srv.kiln("", "machine", "exec", id, "--", "sh", "-c", c.guest)
				if code != 0 || got != c.want {
					t.Errorf("guest: %q (code %d, %s), want %q", got, code, errs, c.want)
				}
				if _, errs, code := srv.kiln("", "machine", "destroy", "--force", id); code != 0 {
					t.Errorf("destroy: %s", errs)
				}
			}
			for p, before := range watched {
				if after := stateOf(t, p); after != before {
					t.Errorf("host file %s changed: %+v -> %+v", p, before, after)
				}
			}
			if _, err := os.Lstat(filepath.Join(hostDir, "planted")); err == nil {
				t.Error("a file was planted on the host")
			}
			ents, _ := os.ReadDir(rootfsDir)
			for _, e := range ents {
				if !strings.HasSuffix(e.Name(), ".ext4") && !strings.HasSuffix(e.Name(), ".json") {
					t.Errorf("left in %s: %s", rootfsDir, e.Name())
				}
			}
		})
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}
