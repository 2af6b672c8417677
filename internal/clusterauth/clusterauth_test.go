package clusterauth

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func newCred(t *testing.T) *Credential {
	t.Helper()
	c, err := New()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestSealOpensWithTheSecretOnly(t *testing.T) {
	c, s := newCred(t), NewSecret()
	text, err := c.Seal(s)
	if err != nil {
		t.Fatal(err)
	}
	// What the database keeps shows no secret: not the token key, not the secret.
	for _, secret := range [][]byte{c.TokenKey, s[:]} {
		if strings.Contains(text, hex.EncodeToString(secret)) || bytes.Contains([]byte(text), secret) {
			t.Fatalf("the sealed credential shows a secret in clear: %s", text)
		}
	}
	got, err := Open(text, s)
	if err != nil {
		t.Fatal(err)
	}
	if !got.CA.Equal(c.CA) || !bytes.Equal(got.TokenKey, c.TokenKey) || !got.caKey.Equal(c.caKey) {
		t.Fatalf("opened credential differs from the sealed one")
	}
	if _, err := Open(text, NewSecret()); !errors.Is(err, ErrWrongSecret) {
		t.Fatalf("a wrong secret opened it: %v", err)
	}
}

// The sealed box is bound to its CA certificate: whoever may write the database cannot
// put their own CA beside the cluster's sealed key.
func TestSealedBoxIsBoundToItsCA(t *testing.T) {
	c, other, s := newCred(t), newCred(t), NewSecret()
	text, _ := c.Seal(s)
	otherText, _ := other.Seal(s)
	var a, b map[string]any
	unmarshal(t, text, &a)
	unmarshal(t, otherText, &b)
	a["ca_cert"] = b["ca_cert"]
	if _, err := Open(marshal(t, a), s); !errors.Is(err, ErrWrongSecret) {
		t.Fatalf("a swapped CA certificate opened: %v", err)
	}
}

func TestHostCertificateVerifiesAgainstItsCAOnly(t *testing.T) {
	c, other := newCred(t), newCred(t)
	l, err := c.Link("host-a", "10.0.0.5", "host-a.internal")
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := l.current()
	leaf := cert.Leaf
	if leaf.Subject.CommonName != "host-a" || len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(net.ParseIP("10.0.0.5")) || len(leaf.DNSNames) != 1 {
		t.Fatalf("certificate names %q, IPs %v, DNS %v", leaf.Subject.CommonName, leaf.IPAddresses, leaf.DNSNames)
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: c.Pool(), KeyUsages: []x509.ExtKeyUsage{usage}, DNSName: "10.0.0.5"}); err != nil {
			t.Fatalf("the host's certificate does not verify against its CA (usage %v): %v", usage, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: other.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Fatal("the host's certificate verifies against another cluster's CA")
	}
}

func TestHostCertificateIsReissuedBeforeItExpires(t *testing.T) {
	l, err := newCred(t).Link("host-a", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	first, _ := l.current()
	if again, _ := l.current(); again != first {
		t.Fatal("reissued a fresh certificate")
	}
	l.Now = func() time.Time { return first.Leaf.NotAfter.Add(-time.Hour) }
	next, _ := l.current()
	if next == first || !next.Leaf.NotAfter.After(first.Leaf.NotAfter) {
		t.Fatalf("a certificate an hour from expiry was kept (until %s)", next.Leaf.NotAfter)
	}
}

// serve runs a TLS server on the link's server configuration that answers with the
// verified client's CN.
func serve(t *testing.T, l *Link) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", l.ServerTLS())
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.TLS.VerifiedChains[0][0].Subject.CommonName)
	}), ErrorLog: log.New(io.Discard, "", 0)}
	srv.SetKeepAlivesEnabled(false)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func get(rt http.RoundTripper, url string) (string, error) {
	resp, err := (&http.Client{Transport: rt, Timeout: 10 * time.Second}).Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func TestPeersLinkOverMutualTLS(t *testing.T) {
	c, other := newCred(t), newCred(t)
	a, _ := c.Link("host-a", "127.0.0.1")
	b, _ := c.Link("host-b", "127.0.0.1")
	stranger, _ := other.Link("host-x", "127.0.0.1")
	addr := serve(t, a)

	// http:// as go-containerregistry names a loopback registry: the link speaks TLS.
	if got, err := get(b.Transport(), "http://"+addr+"/"); err != nil || got != "host-b" {
		t.Fatalf("host-b calling host-a: %q %v", got, err)
	}
	if _, err := get(stranger.Transport(), "https://"+addr+"/"); err == nil {
		t.Fatal("a host of another cluster got through")
	}
	noCert := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: c.Pool()}}
	if _, err := get(noCert, "https://"+addr+"/"); err == nil {
		t.Fatal("a client without a certificate got through")
	}
	// The other way: a client of this cluster does not trust another cluster's server.
	if _, err := get(b.Transport(), "https://"+serve(t, stranger)+"/"); err == nil {
		t.Fatal("host-b trusted a server of another cluster")
	}
}

// settings is the store's Setting: the first value stored for a key wins.
type settings struct {
	mu sync.Mutex
	m  map[string]string
}

func (s *settings) Setting(_ context.Context, key, def string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]string{}
	}
	if v, ok := s.m[key]; ok {
		return v, nil
	}
	s.m[key] = def
	return def, nil
}

func TestJoin(t *testing.T) {
	ctx := context.Background()
	db := &settings{}
	first := t.TempDir()
	c, made, err := Join(ctx, db, first, "")
	if err != nil || !made {
		t.Fatalf("first host: made %v, %v", made, err)
	}
	secretPath := filepath.Join(first, SecretFile)
	if fi, err := os.Stat(secretPath); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("the first host's secret file: %v %v", fi, err)
	}
	secret, _ := os.ReadFile(secretPath)
	if strings.Contains(db.m[settingKey], strings.TrimSpace(string(secret))) {
		t.Fatal("the secret is in the database")
	}
	if again, made, err := Join(ctx, db, first, ""); err != nil || made || !bytes.Equal(again.TokenKey, c.TokenKey) {
		t.Fatalf("the first host restarting: made %v, %v", made, err)
	}

	// A host without the secret is refused, told how to get it, and keeps no secret of
	// its own that would be refused next time too.
	second := t.TempDir()
	_, _, err = Join(ctx, db, second, "")
	if !errors.Is(err, ErrNoSecret) || !strings.Contains(err.Error(), "copy DATA_DIR/cluster-secret") || !strings.Contains(err.Error(), "--cluster-secret-file") {
		t.Fatalf("a host without the secret: %v", err)
	}
	if _, err := os.Stat(filepath.Join(second, SecretFile)); !os.IsNotExist(err) {
		t.Fatalf("the refused host kept a secret file: %v", err)
	}

	// With the secret, as its own file or named by --cluster-secret-file, it joins.
	elsewhere := filepath.Join(t.TempDir(), "secret")
	os.WriteFile(elsewhere, secret, 0o600)
	if got, made, err := Join(ctx, db, second, elsewhere); err != nil || made || !bytes.Equal(got.TokenKey, c.TokenKey) {
		t.Fatalf("joining with --cluster-secret-file: made %v, %v", made, err)
	}
	os.WriteFile(filepath.Join(second, SecretFile), secret, 0o600)
	if got, _, err := Join(ctx, db, second, ""); err != nil || !got.CA.Equal(c.CA) {
		t.Fatalf("joining with DATA_DIR/cluster-secret: %v", err)
	}

	// Another cluster's secret is refused, saying so.
	WriteSecret(elsewhere, NewSecret())
	if _, _, err := Join(ctx, db, second, elsewhere); !errors.Is(err, ErrWrongSecret) || !strings.Contains(err.Error(), "--cluster-secret-file") {
		t.Fatalf("a wrong secret: %v", err)
	}
	if _, _, err := Join(ctx, db, second, filepath.Join(second, "missing")); err == nil {
		t.Fatal("a missing --cluster-secret-file was accepted")
	}
}

// A host given the secret before the cluster exists makes the cluster with it.
func TestJoinMakesTheClusterWithAGivenSecret(t *testing.T) {
	ctx := context.Background()
	db := &settings{}
	p := filepath.Join(t.TempDir(), "secret")
	WriteSecret(p, NewSecret())
	dir := t.TempDir()
	c, made, err := Join(ctx, db, dir, p)
	if err != nil || !made {
		t.Fatalf("made %v, %v", made, err)
	}
	if _, err := os.Stat(filepath.Join(dir, SecretFile)); !os.IsNotExist(err) {
		t.Fatal("wrote a second copy of a secret it was given")
	}
	s, _ := ReadSecret(p)
	if got, err := Open(db.m[settingKey], s); err != nil || !got.CA.Equal(c.CA) {
		t.Fatalf("the given secret does not open the stored credential: %v", err)
	}
}

func unmarshal(t *testing.T, s string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(s), v); err != nil {
		t.Fatal(err)
	}
}

func marshal(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
