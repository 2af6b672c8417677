// Package secrets seals apps' secrets for the store and opens them for the machines that
// get them as environment variables at boot. The store keeps only what Seal returns; the
// key lives in a file beside it (DATA_DIR/secrets.key, or one an operator shares between
// hosts), so a copy of the database alone reveals nothing.
package secrets

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"unicode/utf8"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Bounds on an app's secrets: they all go into every machine's environment at boot, and
// the store keeps every version.
const (
	MaxSecrets    = 256
	MaxNameBytes  = 256
	MaxValueBytes = 64 << 10
	MaxSealed     = 1 << 20
)

const (
	keySize = 32
	// format is the sealed blob's first byte, so that a later format (a rotated key, say)
	// can be told apart from this one.
	format   = 1
	overhead = 1 + 12 + 16 // format, nonce, GCM tag
)

// Keyring holds the key that seals and opens secrets.
type Keyring struct {
	aead cipher.AEAD
}

// LoadOrCreate reads the key at path, creating it (mode 0600, in a directory made 0700
// if missing) with a random key when there is none. A key file that others can read, of
// the wrong size, or a symlink is refused.
func LoadOrCreate(path string) (*Keyring, error) {
	k, err := Load(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return k, err
	}
	if err := create(path); err != nil {
		return nil, err
	}
	return Load(path)
}

// create writes a new random key at path. The key is written in full under another name
// and linked into place, so that a host starting at the same time never reads half a
// key, and a key another host or process made first is kept.
func create(path string) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating the directory of the secrets key %s: %w", path, err)
	}
	key := make([]byte, keySize)
	rand.Read(key)
	tmp, err := os.CreateTemp(dir, ".secrets-key-*")
	if err != nil {
		return fmt.Errorf("creating the secrets key %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	// CreateTemp makes the file 0600 already; the chmod says that it must be.
	err = errors.Join(tmp.Chmod(0o600), write(tmp, key), tmp.Sync(), tmp.Close())
	if err != nil {
		return fmt.Errorf("writing the secrets key %s: %w", path, err)
	}
	if err := os.Link(tmp.Name(), path); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("creating the secrets key %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

func write(f *os.File, b []byte) error {
	_, err := f.Write(b)
	return err
}

// Load reads the key at path, with LoadOrCreate's checks; it never creates one. A
// missing file is fs.ErrNotExist.
func Load(path string) (*Keyring, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, fmt.Errorf("reading the secrets key: %w", err)
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		return nil, errdefs.Invalid("the secrets key %s is a symlink: name the file it points to instead", path)
	}
	// O_NOFOLLOW: a symlink put in place since the check above is refused too.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("reading the secrets key: %w", err)
	}
	defer f.Close()
	if fi, err = f.Stat(); err != nil {
		return nil, fmt.Errorf("reading the secrets key %s: %w", path, err)
	}
	switch {
	case !fi.Mode().IsRegular():
		return nil, errdefs.Invalid("the secrets key %s is not a regular file", path)
	case ownerOf(fi) != os.Geteuid():
		return nil, errdefs.Invalid("the secrets key %s belongs to uid %d, not to the server's (%d): whoever owns it can read or replace it: chown it to the server's user", path, ownerOf(fi), os.Geteuid())
	case fi.Mode().Perm()&0o077 != 0:
		return nil, errdefs.Invalid("the secrets key %s has mode %04o, readable by others than its owner: chmod 600 %s", path, fi.Mode().Perm(), path)
	case fi.Size() != keySize:
		return nil, errdefs.Invalid("the secrets key %s has %d bytes, not %d: restore the right file, or regenerate it with `head -c %d /dev/urandom > %s` (secrets sealed with the old key will not open)",
			path, fi.Size(), keySize, keySize, path)
	}
	key := make([]byte, keySize+1)
	n, err := f.ReadAt(key, 0)
	if n != keySize {
		return nil, fmt.Errorf("reading the secrets key %s: read %d bytes, not %d: %w", path, n, keySize, err)
	}
	block, err := aes.NewCipher(key[:keySize])
	if err != nil {
		return nil, fmt.Errorf("the secrets key %s: %w", path, err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("the secrets key %s: %w", path, err)
	}
	return &Keyring{aead: aead}, nil
}

// Seal encrypts an app's secrets for version with AES-256-GCM, bound to app and version:
// a sealed blob moved to another app or version does not open.
func (k *Keyring) Seal(app string, version int, values map[string]string) ([]byte, error) {
	plain, err := plaintext(values)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, k.aead.NonceSize())
	rand.Read(nonce)
	out := append([]byte{format}, nonce...)
	return k.aead.Seal(out, nonce, plain, boundTo(app, version)), nil
}

// Open decrypts what Seal sealed for the same app and version with the same key.
func (k *Keyring) Open(app string, version int, sealed []byte) (map[string]string, error) {
	if len(sealed) < overhead || sealed[0] != format {
		return nil, fmt.Errorf("secrets version %d of app %s are not sealed secrets (%d bytes)", version, app, len(sealed))
	}
	nonce, box := sealed[1:1+k.aead.NonceSize()], sealed[1+k.aead.NonceSize():]
	plain, err := k.aead.Open(nil, nonce, box, boundTo(app, version))
	if err != nil {
		return nil, fmt.Errorf("secrets version %d of app %s do not open: they were sealed with another key (is this host's secrets key the one the others use?), for another app or version, or changed since: %w",
			version, app, err)
	}
	var values map[string]string
	if err := json.Unmarshal(plain, &values); err != nil {
		return nil, fmt.Errorf("secrets version %d of app %s: %w", version, app, err)
	}
	return values, nil
}

// boundTo is the additional data a blob is sealed with: the app's name is
// length-prefixed, so that no other app and version give the same bytes.
func boundTo(app string, version int) []byte {
	b := []byte("kiln secrets\x00")
	b = binary.AppendUvarint(b, uint64(len(app)))
	b = append(b, app...)
	return binary.BigEndian.AppendUint64(b, uint64(version))
}

var validName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// CheckName refuses a secret name that is not a valid environment variable name.
func CheckName(name string) error {
	if len(name) > MaxNameBytes || !validName.MatchString(name) {
		return errdefs.Invalid("secret name %q is not an environment variable name: a letter or _, then letters, digits or _, at most %d bytes", clip(name), MaxNameBytes)
	}
	return nil
}

// Check refuses secrets past the bounds, or that cannot be environment variables.
func Check(values map[string]string) error {
	_, err := plaintext(values)
	return err
}

// plaintext is what Seal encrypts, if values pass Check.
func plaintext(values map[string]string) ([]byte, error) {
	if len(values) > MaxSecrets {
		return nil, errdefs.Invalid("%d secrets: an app has at most %d", len(values), MaxSecrets)
	}
	for name, v := range values {
		if err := CheckName(name); err != nil {
			return nil, err
		}
		switch {
		case len(v) > MaxValueBytes:
			return nil, errdefs.Invalid("secret %s has %d bytes: a value has at most %d (64 KiB)", name, len(v), MaxValueBytes)
		// The kernel's environment is NUL-terminated strings: the value would be cut.
		case strings.IndexByte(v, 0) >= 0:
			return nil, errdefs.Invalid("secret %s holds a NUL byte, which no environment variable can", name)
		// Sealed as JSON, which would silently replace the bytes.
		case !utf8.ValidString(v):
			return nil, errdefs.Invalid("secret %s is not valid UTF-8: encode binary values (base64)", name)
		}
	}
	plain, err := json.Marshal(values)
	if err != nil {
		return nil, err
	}
	if n := len(plain) + overhead; n > MaxSealed {
		return nil, errdefs.Invalid("the secrets seal to %d bytes: an app's secrets seal to at most %d (1 MiB) in all", n, MaxSealed)
	}
	return plain, nil
}

// clip shortens a hostile name for an error message.
func clip(s string) string {
	if len(s) <= 64 {
		return s
	}
	return s[:64] + "…"
}

// ownerOf is a file's owner's uid (-1 where the platform does not say).
func ownerOf(fi fs.FileInfo) int {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid)
	}
	return -1
}
