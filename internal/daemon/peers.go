package daemon

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"path/filepath"

	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/clusterauth"
	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// tokenKey is the key this host signs and checks tokens with: DATA_DIR/token-key on a
// single host; on hosts sharing PostgreSQL, the cluster's, from the cluster credential
// (made here on an empty database, otherwise opened with the cluster's secret), which
// is returned too, to issue this host's link.
func tokenKey(ctx context.Context, o Options, db *sqlstore.DB, shared bool, logf func(string, ...any)) (auth.Key, *clusterauth.Credential, error) {
	if !shared {
		k, err := localTokenKey(o.DataDir)
		return k, nil, err
	}
	cred, made, err := clusterauth.Join(ctx, db, o.DataDir, o.ClusterSecretFile)
	if err != nil {
		return nil, nil, err
	}
	switch {
	case made && o.ClusterSecretFile == "":
		logf("made this cluster's credential (its CA and token key, sealed in the database). Its secret is in %s: "+
			"a host joining the cluster needs a copy, as its own DATA_DIR/%s (mode 0600) or named by --cluster-secret-file",
			filepath.Join(o.DataDir, clusterauth.SecretFile), clusterauth.SecretFile)
	case made:
		logf("made this cluster's credential, sealed under the secret in %s: hosts joining the cluster need a copy", o.ClusterSecretFile)
	}
	return cred.TokenKey, cred, nil
}

// peerLink is this host's end of the cluster's links: a listener where other hosts call
// the API (forwarded calls, image pulls) over mutual TLS, and the transport to call them.
// A nil *peerLink is a single host's: no listener, no link.
type peerLink struct {
	ln   net.Listener
	link *clusterauth.Link
	url  string
}

// listenPeers opens the peer listener on --peer-listen (by default the API's address
// on a free port; the port is registered in the database, so others find it) and
// issues this host's certificate for the address other hosts reach it at: --advertise's
// host, as for the API.
func listenPeers(o Options, cred *clusterauth.Credential, name string, api net.Addr, advertise string) (*peerLink, error) {
	if cred == nil {
		return nil, nil
	}
	addr := o.PeerListen
	if addr == "" {
		host, _, _ := net.SplitHostPort(api.String())
		addr = net.JoinHostPort(host, "0")
	}
	u, err := url.Parse(advertise)
	if err != nil || u.Hostname() == "" {
		return nil, fmt.Errorf("--advertise %q: want a URL like http://10.0.0.5:4280", advertise)
	}
	link, err := cred.Link(name, u.Hostname())
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listening for the cluster's hosts on %s: %w (choose another with --peer-listen)", addr, err)
	}
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return &peerLink{ln: ln, link: link, url: "https://" + net.JoinHostPort(u.Hostname(), port)}, nil
}

// URL is where other hosts reach this one, as registered; "" for a single host.
func (p *peerLink) URL() string {
	if p == nil {
		return ""
	}
	return p.url
}

// Transport calls other hosts' peer listeners; nil for a single host.
func (p *peerLink) Transport() http.RoundTripper {
	if p == nil {
		return nil
	}
	return p.link.Transport()
}

// serve serves h to the other hosts: only a client whose certificate the cluster's CA
// issued gets past the handshake, and the API then reads who the caller is from what
// the calling host says (server.Peer). Slow clients are held to the API's limits.
func (p *peerLink) serve(ctx context.Context, h http.Handler, lim connlimit.HTTP, stack *cleanups, logf func(string, ...any)) {
	if p == nil {
		return
	}
	srv, ln := connlimit.NewServer(tls.NewListener(p.ln, p.link.ServerTLS()), h, lim)
	go func() {
		if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
			logf("the peer listener stopped: %v; calls forwarded to this host fail until kiln restarts", err)
		}
	}()
	stack.push(func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
		defer cancel()
		srv.Shutdown(sctx)
	})
	logf("other hosts of the cluster reach this one at %s (mutual TLS, certificates from the cluster's CA)", p.url)
}
