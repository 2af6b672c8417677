package daemon

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/registry"
)

// localTokenKey reads DATA_DIR/token-key, the key a single host signs tokens with,
// creating it on first start.
func localTokenKey(dataDir string) (auth.Key, error) {
	p := filepath.Join(dataDir, "token-key")
	if b, err := os.ReadFile(p); err == nil {
		k, err := hex.DecodeString(strings.TrimSpace(string(b)))
		if err != nil || len(k) < 32 {
			return nil, fmt.Errorf("%s is not a token key (64 hex digits): remove it to make a new one, which replaces every token", p)
		}
		return k, nil
	} else if !os.IsNotExist(err) {
		return nil, err
	}
	k := make([]byte, 32)
	rand.Read(k)
	return k, atomicfile.WriteFile(p, []byte(hex.EncodeToString(k)+"\n"), 0o600)
}

// writeAdminToken keeps DATA_DIR/admin-token, the operator's token, matching the key:
// it is minted from it, so every host of a cluster writes the same one. It returns the
// token and whether the file changed (first start, a new key, or an older kiln's token).
func writeAdminToken(dataDir string, key auth.Key) (string, bool, error) {
	p := filepath.Join(dataDir, "admin-token")
	tok := key.Mint(auth.OperatorID)
	if b, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(b)) == tok {
		return tok, false, nil
	}
	return tok, true, atomicfile.WriteFile(p, []byte(tok+"\n"), 0o600)
}

// projectImages turns a registry rule into a build's: the project's identity deciding
// on the repository of a localhost/ reference.
func projectImages(images image.Registries, rule func(auth.Identity, string) error) func(project, ref string) error {
	return func(project, ref string) error {
		repo, ok := images.LocalRepo(ref)
		if !ok {
			return errdefs.Invalid("image %s is not in kiln's registry: builds use and tag localhost/ images", ref)
		}
		return rule(registry.ProjectIdentity(project), repo)
	}
}
