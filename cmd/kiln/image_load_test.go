package main_test

import (
	"archive/tar"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/auth/authtest"

	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/server"
)

// `kiln image load` of a file that is not an image names the user's file (never the
// server's temporary copy of it), says what is wrong and how to make a good one, and
// exits 2 as any invalid argument does. No VM: the API runs in the test, and no request
// gets as far as a registry.
func TestImageLoadNamesTheUsersFile(t *testing.T) {
	buildKiln(t)
	api := httptest.NewServer((&server.Server{Auth: opAuth, Images: image.Registries{Local: "127.0.0.1:1"}}).Handler())
	defer api.Close()
	e := &env{t: t, dataDir: t.TempDir()}
	dir := t.TempDir()
	hostname := filepath.Join(dir, "hostname") // what `kiln image load /etc/hostname` sends
	if err := os.WriteFile(hostname, []byte("myhost\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(dir, "notes.tar") // a tar, of no image
	f, err := os.Create(plain)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	tw.WriteHeader(&tar.Header{Name: "notes.txt", Mode: 0o644, Size: 2})
	tw.Write([]byte("hi"))
	tw.Close()
	f.Close()
	missing := filepath.Join(dir, "app.tar")
	for _, c := range []struct {
		name string
		file string
		code int
		want []string
	}{
		{"not a tar", hostname, 2, []string{hostname, "not a tar archive", "docker save"}},
		{"a tar of no image", plain, 2, []string{plain, "neither a `docker save` tarball", "docker save"}},
		{"missing", missing, 1, []string{missing, "no such file"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, errs, code := e.run("", "image", "load", c.file, "--api-url", api.URL, "--token", opToken)
			if code != c.code {
				t.Errorf("exit %d, want %d: %s", code, c.code, errs)
			}
			for _, w := range c.want {
				if !strings.Contains(errs, w) {
					t.Errorf("stderr does not say %q: %s", w, errs)
				}
			}
			if strings.Contains(errs, "kiln-upload") {
				t.Errorf("the error names the server's temporary file: %s", errs)
			}
		})
	}
}

// opAuth checks tokens; opToken is the operator's.
var opAuth, opToken = authtest.Operator()
