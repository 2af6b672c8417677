// Package clusterauth is how the hosts of a kiln cluster (several servers sharing one
// PostgreSQL) trust each other: a cluster credential, made by the first host, of a
// certificate authority and the key every host signs users' tokens with.
//
// The database is shared, and may be read by more people than the hosts (backups, a
// managed service), so it keeps only what is safe there: the CA's certificate in clear,
// and the CA's private key and the token key sealed (AES-256-GCM) under a key derived
// from the cluster secret. The secret never enters the database: the first host writes
// it to DATA_DIR/cluster-secret, and the operator copies it to each joining host. A host
// without it cannot open the credential, so it can neither mint tokens nor link to the
// other hosts, and refuses to start.
//
// With the credential open, each host issues itself a certificate at start (Link) and
// the hosts talk over mutual TLS: forwarded API calls and image pulls between their
// registries. Every host holds the CA's key, so every host is trusted alike; the CA
// keeps out whoever is not a host of this cluster.
//
// The server assembly (internal/daemon) calls Join at start; nothing else needs this
// package but tests.
package clusterauth

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// ErrWrongSecret is a secret that does not open the stored credential: it belongs to
// another cluster, or the file was changed.
var ErrWrongSecret = errors.New("the cluster secret does not open the cluster's credential")

// caValidity is how long the cluster's CA lasts. Hosts reissue their own certificates
// (hostValidity) as they go; replacing the CA means a new cluster credential.
const caValidity = 20 * 365 * 24 * time.Hour

// sealInfo labels the key derived from the secret (HKDF's info), so that the secret's
// key serves this purpose alone; it also binds the sealed box to its version.
const sealInfo = "kiln cluster credential v1"

// Credential is the cluster's credential, open: the CA and the token key.
type Credential struct {
	CA    *x509.Certificate
	caKey *ecdsa.PrivateKey
	// TokenKey signs and checks every user token of the cluster (auth.Key).
	TokenKey []byte
}

// New makes a cluster credential: a fresh CA and token key.
func New() (*Credential, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "kiln cluster CA", Organization: []string{"kiln"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true, // it signs hosts, never another CA
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	tk := make([]byte, 32)
	rand.Read(tk)
	return &Credential{CA: ca, caKey: key, TokenKey: tk}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

// stored is the credential as the database keeps it.
type stored struct {
	// CA is the CA's certificate, PEM, in clear: it proves nothing on its own.
	CA string `json:"ca_cert"`
	// Sealed is nonce || AES-256-GCM(secrets), the CA's DER as additional data, so a
	// box moved under another certificate does not open.
	Sealed []byte `json:"sealed"`
}

// secrets is what is sealed.
type secrets struct {
	CAKey    []byte `json:"ca_key"` // PKCS #8
	TokenKey []byte `json:"token_key"`
}

// aead is the cipher the secret's derived key seals with.
func (s Secret) aead() cipher.AEAD {
	k, err := hkdf.Key(sha256.New, s[:], nil, sealInfo, 32)
	if err != nil {
		panic(err) // only for a length HKDF cannot make
	}
	b, _ := aes.NewCipher(k) // 32 bytes: AES-256
	g, _ := cipher.NewGCM(b)
	return g
}

// Seal returns the credential as the database may keep it, its secrets sealed under s.
func (c *Credential) Seal(s Secret) (string, error) {
	caKey, err := x509.MarshalPKCS8PrivateKey(c.caKey)
	if err != nil {
		return "", err
	}
	plain, err := json.Marshal(secrets{CAKey: caKey, TokenKey: c.TokenKey})
	if err != nil {
		return "", err
	}
	g := s.aead()
	nonce := make([]byte, g.NonceSize())
	rand.Read(nonce)
	st := stored{
		CA:     string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.CA.Raw})),
		Sealed: g.Seal(nonce, nonce, plain, c.CA.Raw),
	}
	b, err := json.Marshal(st)
	return string(b), err
}

// Open reads a sealed credential with the secret. A secret that does not open it is
// ErrWrongSecret.
func Open(text string, s Secret) (*Credential, error) {
	var st stored
	if err := json.Unmarshal([]byte(text), &st); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "the cluster credential in the database is not one kiln wrote")
	}
	blk, _ := pem.Decode([]byte(st.CA))
	if blk == nil {
		return nil, errdefs.New(errdefs.ErrInvalid, "the cluster credential in the database has no CA certificate")
	}
	ca, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "the cluster's CA certificate")
	}
	g := s.aead()
	if len(st.Sealed) < g.NonceSize() {
		return nil, errdefs.New(errdefs.ErrInvalid, "the cluster credential in the database is cut short")
	}
	plain, err := g.Open(nil, st.Sealed[:g.NonceSize()], st.Sealed[g.NonceSize():], ca.Raw)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, ErrWrongSecret, "opening the cluster credential")
	}
	var sec secrets
	if err := json.Unmarshal(plain, &sec); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "the cluster credential's sealed part")
	}
	k, err := x509.ParsePKCS8PrivateKey(sec.CAKey)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "the cluster CA's key")
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok || !key.PublicKey.Equal(ca.PublicKey) {
		return nil, errdefs.New(errdefs.ErrInvalid, "the cluster CA's sealed key does not match its certificate")
	}
	if len(sec.TokenKey) < 32 {
		return nil, errdefs.New(errdefs.ErrInvalid, "the cluster's token key is %d bytes, want 32", len(sec.TokenKey))
	}
	return &Credential{CA: ca, caKey: key, TokenKey: sec.TokenKey}, nil
}

// Pool is the CA as the only root a link trusts.
func (c *Credential) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.CA)
	return p
}

// issue makes a host's certificate, for both ends of a link: CN is the host's name
// (how the other end names it), the SANs the addresses it is reached at.
func (c *Credential) issue(name string, addrs []string, now time.Time, validity time.Duration) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name, Organization: []string{"kiln"}},
		NotBefore:    now.Add(-time.Hour), // hosts' clocks differ a little
		NotAfter:     now.Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	setSANs(tmpl, addrs)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.CA, &key.PublicKey, c.caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("issuing host %s's certificate: %w", name, err)
	}
	cert, err := x509.ParseCertificate(der)
	return cert, key, err
}
