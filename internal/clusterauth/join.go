package clusterauth

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// SecretFile is the secret's file in a host's data directory.
const SecretFile = "cluster-secret"

// settingKey names the sealed credential among the cluster's settings.
const settingKey = "cluster_credential"

// ErrNoSecret is a host joining a cluster without its secret.
var ErrNoSecret = errors.New("this database belongs to a kiln cluster, and this host lacks the cluster's secret")

// Secret opens the cluster's credential. It is kept in hosts' data directories and
// never in the database.
type Secret [32]byte

// NewSecret makes a random secret.
func NewSecret() Secret {
	var s Secret
	rand.Read(s[:])
	return s
}

// ReadSecret reads a secret file (64 hex digits).
func ReadSecret(path string) (Secret, error) {
	var s Secret
	b, err := os.ReadFile(path)
	if err != nil {
		return s, err
	}
	k, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(k) != len(s) {
		return s, errdefs.New(errdefs.ErrInvalid, "%s is not a cluster secret (64 hex digits): copy DATA_DIR/%s from a host of the cluster", path, SecretFile)
	}
	copy(s[:], k)
	return s, nil
}

// WriteSecret writes the secret to path, readable by its owner alone.
func WriteSecret(path string, s Secret) error {
	return atomicfile.WriteFile(path, []byte(hex.EncodeToString(s[:])+"\n"), 0o600)
}

// Settings is where the sealed credential is kept: the cluster's shared settings, in
// which the first host to store a key decides its value (store.Hosts.Setting).
type Settings interface {
	Setting(ctx context.Context, key, def string) (string, error)
}

// Join opens the cluster's credential from the database with this host's secret: the
// one in secretFile if set (--cluster-secret-file), else DATA_DIR/cluster-secret. On a
// database with no credential yet it makes one, and made is true: sealed under the
// secret given, or under a new one written to DATA_DIR/cluster-secret. A host without
// the secret, or with another cluster's, gets an error saying how to get it.
func Join(ctx context.Context, st Settings, dataDir, secretFile string) (cred *Credential, made bool, err error) {
	own := filepath.Join(dataDir, SecretFile)
	path := own
	if secretFile != "" {
		path = secretFile
	}
	fix := fmt.Sprintf("copy DATA_DIR/%s from a host of the cluster to %s (mode 0600), or pass --cluster-secret-file PATH", SecretFile, own)
	secret, err := ReadSecret(path)
	have := err == nil
	switch {
	case errors.Is(err, os.ErrNotExist) && secretFile == "":
		// Perhaps the first host: the secret is written before the credential is
		// stored, so a cluster never exists whose secret is nowhere.
		secret = NewSecret()
		if err := WriteSecret(own, secret); err != nil {
			return nil, false, fmt.Errorf("writing the cluster secret: %w", err)
		}
	case err != nil:
		return nil, false, fmt.Errorf("reading the cluster secret: %w", err)
	}
	fresh, err := New()
	if err != nil {
		return nil, false, err
	}
	sealed, err := fresh.Seal(secret)
	if err != nil {
		return nil, false, err
	}
	kept, err := st.Setting(ctx, settingKey, sealed)
	if err != nil {
		if !have {
			os.Remove(own)
		}
		return nil, false, fmt.Errorf("reading the cluster credential: %w", err)
	}
	if kept == sealed {
		return fresh, true, nil
	}
	if !have {
		os.Remove(own) // another host made the cluster: this secret opens nothing
		return nil, false, errdefs.Wrap(errdefs.ErrInvalid, fmt.Errorf("%w: %s", ErrNoSecret, fix), "kiln cannot join this cluster")
	}
	cred, err = Open(kept, secret)
	if errors.Is(err, ErrWrongSecret) {
		return nil, false, errdefs.Wrap(errdefs.ErrInvalid, fmt.Errorf("%w (the secret in %s is another cluster's, or was changed): %s", ErrWrongSecret, path, fix), "kiln cannot join this cluster")
	}
	return cred, false, err
}
