package clusterauth

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"sync"
	"time"
)

// hostValidity is how long a host's certificate lasts; a host reissues its own once a
// third of that is left, so a long-running server never serves an expired one.
const hostValidity = 90 * 24 * time.Hour

// Link is this host's end of the cluster's links: its certificate, issued by the
// cluster's CA, presented both as a server (the peer listener) and as a client
// (forwarding, image pulls), and the CA as the only root trusted either way.
type Link struct {
	// Name is this host's name: its certificate's CN.
	Name  string
	cred  *Credential
	addrs []string
	roots *x509.CertPool
	rt    http.RoundTripper
	// Now is the clock; nil is time.Now (tests set it).
	Now func() time.Time

	mu      sync.Mutex
	cert    *tls.Certificate
	renewAt time.Time
}

// Link issues this host's certificate: CN name, and the addresses (host names or IPs,
// without ports) other hosts reach it at as its SANs.
func (c *Credential) Link(name string, addrs ...string) (*Link, error) {
	l := &Link{Name: name, cred: c, addrs: addrs, roots: c.Pool()}
	if _, err := l.current(); err != nil {
		return nil, err
	}
	l.rt = peerTransport{&http.Transport{
		TLSClientConfig: l.ClientTLS(),
		// Peers are reached directly: never through the environment's proxy.
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout: 10 * time.Second,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     90 * time.Second,
	}}
	return l, nil
}

func (l *Link) now() time.Time {
	if l.Now != nil {
		return l.Now()
	}
	return time.Now()
}

// current is this host's certificate, reissued when it is getting old.
func (l *Link) current() (*tls.Certificate, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if l.cert != nil && now.Before(l.renewAt) {
		return l.cert, nil
	}
	cert, key, err := l.cred.issue(l.Name, l.addrs, now, hostValidity)
	if err != nil {
		return nil, err
	}
	l.cert = &tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}
	l.renewAt = cert.NotAfter.Add(-hostValidity / 3)
	return l.cert, nil
}

// ServerTLS is the peer listener's configuration: only a client with a certificate the
// cluster's CA issued gets through the handshake. HTTP/1.1 alone, since a forwarded
// exec upgrades its connection.
func (l *Link) ServerTLS() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		ClientAuth:     tls.RequireAndVerifyClientCert,
		ClientCAs:      l.roots,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return l.current() },
		NextProtos:     []string{"http/1.1"},
	}
}

// ClientTLS is a configuration to call other hosts with: this host's certificate, and
// the cluster's CA as the only root.
func (l *Link) ClientTLS() *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		RootCAs:              l.roots,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return l.current() },
		NextProtos:           []string{"http/1.1"},
	}
}

// Transport calls other hosts' peer listeners; one is shared, so connections are kept.
func (l *Link) Transport() http.RoundTripper { return l.rt }

// peerTransport speaks TLS whatever scheme a request names: go-containerregistry picks
// http for registries on loopback and private addresses (where hosts of a cluster
// usually are), and a peer listener speaks nothing but TLS.
type peerTransport struct{ t *http.Transport }

func (p peerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Scheme != "https" {
		r = r.Clone(r.Context())
		r.URL.Scheme = "https"
	}
	return p.t.RoundTrip(r)
}

// setSANs names the addresses a certificate is good for.
func setSANs(c *x509.Certificate, addrs []string) {
	for _, a := range addrs {
		if a == "" {
			continue
		}
		if ip := net.ParseIP(a); ip != nil {
			c.IPAddresses = append(c.IPAddresses, ip)
		} else {
			c.DNSNames = append(c.DNSNames, a)
		}
	}
}
