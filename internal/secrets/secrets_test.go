package secrets_test

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/secrets"
)

func keyring(t *testing.T) (*secrets.Keyring, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "secrets.key")
	k, err := secrets.LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	return k, path
}

func TestSealRoundTrip(t *testing.T) {
	k, _ := keyring(t)
	for _, values := range []map[string]string{
		{"DATABASE_URL": "postgres://u:p@db/x", "EMPTY": "", "UNICODE": "é€😀\n\"quoted\""},
		{},
	} {
		sealed, err := k.Seal("web", 3, values)
		if err != nil {
			t.Fatal(err)
		}
		for v := range values {
			if v != "" && values[v] != "" && bytes.Contains(sealed, []byte(values[v])) {
				t.Errorf("the sealed blob holds %s in clear", v)
			}
		}
		got, err := k.Open("web", 3, sealed)
		if err != nil || !maps.Equal(got, values) {
			t.Errorf("opened %v, %v; want %v", got, err, values)
		}
		again, _ := k.Seal("web", 3, values)
		if bytes.Equal(again, sealed) {
			t.Error("sealing twice gave the same bytes: the nonce is not random")
		}
	}
}

// A sealed blob opens only for the app and version it was sealed for, with the key it
// was sealed with, and not once any byte of it changed.
func TestSealedOpensOnlyWhereItBelongs(t *testing.T) {
	k, _ := keyring(t)
	other, _ := keyring(t)
	sealed, err := k.Seal("web", 3, map[string]string{"TOKEN": "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name    string
		k       *secrets.Keyring
		app     string
		version int
	}{
		{"another app", k, "api", 3},
		{"an app whose name ends like it", k, "we", 3},
		{"another version", k, "web", 4},
		{"another key", other, "web", 3},
	} {
		if got, err := c.k.Open(c.app, c.version, sealed); err == nil {
			t.Errorf("%s: opened %v", c.name, got)
		}
	}
	for i := range sealed {
		tampered := bytes.Clone(sealed)
		tampered[i] ^= 0x01
		if got, err := k.Open("web", 3, tampered); err == nil {
			t.Fatalf("byte %d changed: opened %v", i, got)
		}
	}
	for _, short := range [][]byte{nil, sealed[:10], sealed[:len(sealed)-1]} {
		if _, err := k.Open("web", 3, short); err == nil {
			t.Errorf("%d bytes opened", len(short))
		}
	}
}

// A new key is private to its owner, and the same key is read again from it.
func TestKeyFileCreatedPrivate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	path := filepath.Join(dir, "secrets.key")
	if _, err := secrets.Load(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("loading a missing key: %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load created %s: %v", dir, err)
	}
	k, err := secrets.LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Size() != 32 {
		t.Fatalf("the key file: %v %v", fi.Mode(), err)
	}
	if di, _ := os.Stat(dir); di.Mode().Perm() != 0o700 {
		t.Errorf("its directory has mode %v", di.Mode())
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("the directory holds %d files, want the key alone", len(ents))
	}
	sealed, _ := k.Seal("web", 1, map[string]string{"A": "1"})
	for _, load := range []func(string) (*secrets.Keyring, error){secrets.Load, secrets.LoadOrCreate} {
		again, err := load(path)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := again.Open("web", 1, sealed); err != nil || got["A"] != "1" {
			t.Errorf("the key read again does not open what the first sealed: %v", err)
		}
	}
}

// Hosts starting at once with no key agree on one.
func TestKeyCreatedOnceUnderConcurrency(t *testing.T) {
	path := filepath.Join(t.TempDir(), "secrets.key")
	const starts = 8
	rings := make([]*secrets.Keyring, starts)
	var wg sync.WaitGroup
	for i := range starts {
		wg.Go(func() {
			k, err := secrets.LoadOrCreate(path)
			if err != nil {
				t.Error(err)
			}
			rings[i] = k
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	sealed, _ := rings[0].Seal("web", 1, map[string]string{"A": "1"})
	for i, k := range rings {
		if _, err := k.Open("web", 1, sealed); err != nil {
			t.Errorf("start %d has another key: %v", i, err)
		}
	}
}

func TestUnsafeKeyFileRefused(t *testing.T) {
	dir := t.TempDir()
	_, good := keyring(t)
	key, _ := os.ReadFile(good)
	write := func(name string, b []byte, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
		return p
	}
	link := filepath.Join(dir, "link.key")
	if err := os.Symlink(good, link); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, path, fix string
	}{
		{"readable by others", write("open.key", key, 0o644), "chmod 600"},
		{"readable by its group", write("group.key", key, 0o640), "chmod 600"},
		{"too short", write("short.key", key[:16], 0o600), "regenerate"},
		{"too long", write("long.key", append(key, '\n'), 0o600), "regenerate"},
		{"a symlink", link, "symlink"},
	} {
		for _, load := range []func(string) (*secrets.Keyring, error){secrets.Load, secrets.LoadOrCreate} {
			_, err := load(c.path)
			if err == nil || !strings.Contains(err.Error(), c.path) || !strings.Contains(err.Error(), c.fix) {
				t.Errorf("%s: %v, want an error naming %s and %q", c.name, err, c.path, c.fix)
			}
		}
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "short.key")); len(b) != 16 {
		t.Error("LoadOrCreate replaced a key of the wrong size")
	}
}

func TestCheckName(t *testing.T) {
	for _, ok := range []string{"A", "_", "DATABASE_URL", "a1_b2", "_9", strings.Repeat("K", 256)} {
		if err := secrets.CheckName(ok); err != nil {
			t.Errorf("%q refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "1A", "A-B", "A B", "A=B", "É", "A\x00", "A\n", "$A", strings.Repeat("K", 257)} {
		err := secrets.CheckName(bad)
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "letter or _") {
			t.Errorf("%q: %v", bad, err)
		}
	}
	if err := secrets.CheckName("BAD-NAME"); !strings.Contains(err.Error(), `"BAD-NAME"`) {
		t.Errorf("the error does not name the secret: %v", err)
	}
}

func TestCheckBounds(t *testing.T) {
	many := func(n int, size int) map[string]string {
		m := map[string]string{}
		for i := range n {
			m[fmt.Sprint("K", i)] = strings.Repeat("v", size)
		}
		return m
	}
	for _, ok := range []map[string]string{many(256, 1), many(1, 64<<10), many(15, 64<<10)} {
		if err := secrets.Check(ok); err != nil {
			t.Errorf("%d secrets refused: %v", len(ok), err)
		}
	}
	k, _ := keyring(t)
	for _, c := range []struct {
		name   string
		values map[string]string
		limit  string
	}{
		{"257 secrets", many(257, 1), "at most 256"},
		{"a value over 64 KiB", many(1, 64<<10+1), "64 KiB"},
		{"over 1 MiB in all", many(16, 64<<10), "1 MiB"},
		{"a bad name", map[string]string{"NOT-AN-ENV": "x"}, "NOT-AN-ENV"},
		{"a NUL byte", map[string]string{"A": "x\x00y"}, "NUL"},
		{"invalid UTF-8", map[string]string{"A": "\xff"}, "UTF-8"},
	} {
		err := secrets.Check(c.values)
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), c.limit) {
			t.Errorf("%s: %v, want an invalid-argument error naming %q", c.name, err, c.limit)
		}
		if _, err := k.Seal("web", 1, c.values); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s sealed: %v", c.name, err)
		}
	}
}

// A key file another user owns is refused: its owner could read or replace it.
func TestKeyOwnedByAnotherUserRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test chowns a file: run it as root (make test does)")
	}
	path := filepath.Join(t.TempDir(), "secrets.key")
	if _, err := secrets.LoadOrCreate(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, 1234, 1234); err != nil {
		t.Fatal(err)
	}
	if _, err := secrets.Load(path); err == nil || !strings.Contains(err.Error(), "uid 1234") {
		t.Fatalf("a key owned by uid 1234: %v", err)
	}
}
