// Package auth is who may call kiln: tokens, what they may do, and the identity a call
// carries once its token is checked.
//
// A token is a small macaroon of kiln's own format. It names an ID, then caveats, each a
// line "key=value" that narrows what the token allows, and ends in an HMAC chain: the
// first link is keyed by a key derived from the cluster's token key and the ID, and each
// caveat is folded into the next link. Anyone holding a token can add a caveat offline
// (the chain goes on from the last link) but cannot remove one (that would need an
// earlier link, which the token no longer carries), so a token can be narrowed and never
// widened. Caveats are read as restrictions that all hold at once, so adding one never
// allows more.
//
// Why not a library: gopkg.in/macaroon.v2 is no longer maintained, and Fly's
// github.com/superfly/macaroon carries Fly's own caveat registry, third-party discharge
// and organisation model, which kiln has no use for. The format here is about a hundred
// lines over crypto/hmac and fully covered by this package's tests.
package auth

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"strings"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Prefix starts every kiln token. It is not one of Fly's macaroon prefixes (fm1r_,
// fm2_, ...), so Fly's client passes it through as it is.
const Prefix = "kiln1_"

// maxTokenBytes bounds a token read from a request: a token with hundreds of caveats is
// not one kiln made.
const maxTokenBytes = 8 << 10

// Key signs tokens: 32 secret bytes shared by the hosts of a cluster.
type Key []byte

// Token is a parsed token: its ID and caveats, and the last link of its chain.
type Token struct {
	ID      string
	Caveats []string
	sig     []byte
}

func b64() *base64.Encoding { return base64.RawURLEncoding }

// rootKey is the first link's key for a token ID.
func (k Key) rootKey(id string) []byte {
	m := hmac.New(sha256.New, k)
	m.Write([]byte("kiln token v1\x00" + id))
	return m.Sum(nil)
}

func link(prev []byte, caveat string) []byte {
	m := hmac.New(sha256.New, prev)
	m.Write([]byte(caveat))
	return m.Sum(nil)
}

// Mint makes a token with the given ID and caveats.
func (k Key) Mint(id string, caveats ...string) string {
	t := Token{ID: id, sig: link(k.rootKey(id), id)}
	return t.Attenuate(caveats...)
}

// Attenuate returns the token with more caveats; it needs no key.
func (t Token) Attenuate(caveats ...string) string {
	sig := t.sig
	for _, c := range caveats {
		sig = link(sig, c)
	}
	body := strings.Join(append([]string{t.ID}, append(append([]string(nil), t.Caveats...), caveats...)...), "\n")
	return Prefix + b64().EncodeToString([]byte(body)) + "." + b64().EncodeToString(sig)
}

// Parse reads a token without checking its signature.
func Parse(s string) (Token, error) {
	s = strings.TrimSpace(s)
	bad := errdefs.New(errdefs.ErrInvalid, "not a kiln token: kiln tokens start with %q (the operator's is in DATA_DIR/admin-token; make others with `kiln tokens create`)", Prefix)
	if len(s) > maxTokenBytes {
		return Token{}, bad
	}
	rest, ok := strings.CutPrefix(s, Prefix)
	if !ok {
		return Token{}, bad
	}
	bodyB64, sigB64, ok := strings.Cut(rest, ".")
	if !ok {
		return Token{}, bad
	}
	body, err1 := b64().DecodeString(bodyB64)
	sig, err2 := b64().DecodeString(sigB64)
	if err1 != nil || err2 != nil || len(sig) != sha256.Size {
		return Token{}, bad
	}
	lines := strings.Split(string(body), "\n")
	if lines[0] == "" {
		return Token{}, bad
	}
	return Token{ID: lines[0], Caveats: lines[1:], sig: sig}, nil
}

// Verify checks the token's chain against the key.
func (k Key) Verify(t Token) bool {
	sig := link(k.rootKey(t.ID), t.ID)
	for _, c := range t.Caveats {
		sig = link(sig, c)
	}
	return len(k) > 0 && hmac.Equal(sig, t.sig)
}

// Hash is what the store keeps of a token: its SHA-256, never the token.
func Hash(token string) string {
	h := sha256.Sum256([]byte(strings.TrimSpace(token)))
	return hex.EncodeToString(h[:])
}
