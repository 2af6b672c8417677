package image_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/clusterauth"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/registry"
)

// servePeer serves h on a peer listener of the link, as kiln's servers do.
func servePeer(t *testing.T, l *clusterauth.Link, h http.Handler) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", l.ServerTLS())
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ErrorLog: log.New(io.Discard, "", 0)}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// A host pulls an image only another host has from that host's registry, over the
// cluster's mutual TLS with its own certificate and no token; a host of another
// cluster, or one sending the token the old way, finds nothing.
func TestPeerPullsOverTheClusterLink(t *testing.T) {
	ctx := context.Background()
	cred, _ := clusterauth.New()
	owner, _ := cred.Link("host-a", "127.0.0.1")
	puller, _ := cred.Link("host-b", "127.0.0.1")

	// host-a's registry, with the image, on its API and its peer listener.
	regA := registry.Handler(ctx, t.TempDir(), registry.Access{Auth: opAuth})
	apiA := httptest.NewServer(regA)
	defer apiA.Close()
	docker := filepath.Join(t.TempDir(), "app.tar")
	imagetest.WriteDockerTarball(t, imagetest.App(t), "app:1", docker)
	d, _, err := image.Registries{Local: strings.TrimPrefix(apiA.URL, "http://"), Token: opToken}.Load(ctx, docker)
	if err != nil {
		t.Fatal(err)
	}
	peerA := servePeer(t, owner, regA)

	// host-b's own registry lacks it.
	apiB := httptest.NewServer(registry.Handler(ctx, t.TempDir(), registry.Access{Auth: opAuth}))
	defer apiB.Close()
	regs := image.Registries{Local: strings.TrimPrefix(apiB.URL, "http://"), Token: opToken,
		Peers: func(context.Context) []string { return []string{peerA} }, PeerTransport: puller.Transport()}
	img, err := regs.Resolve(ctx, "localhost/app:1")
	if err != nil {
		t.Fatalf("pulling from the peer: %v", err)
	}
	if got, _ := img.Digest(); got.String() != d {
		t.Fatalf("pulled %s, want %s", got, d)
	}
	layers, _ := img.Layers()
	rc, err := layers[0].Compressed()
	if err != nil {
		t.Fatalf("a layer from the peer: %v", err)
	}
	if _, err := io.Copy(io.Discard, rc); err != nil {
		t.Fatalf("a layer from the peer: %v", err)
	}
	rc.Close()

	other, _ := clusterauth.New()
	stranger, _ := other.Link("host-x", "127.0.0.1")
	for name, rt := range map[string]http.RoundTripper{"another cluster's host": stranger.Transport(), "the token alone": nil} {
		regs.PeerTransport = rt
		if _, err := regs.Resolve(ctx, "localhost/app:1"); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("%s pulled from the peer: %v", name, err)
		}
	}
}
