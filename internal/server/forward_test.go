package server_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/auth/authtest"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/cluster"
	"github.com/kilnhq/kiln/internal/clusterauth"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// seen keeps the headers of the last call a peer listener answered.
type seen struct {
	mu     sync.Mutex
	header http.Header
	from   string
}

func (s *seen) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.header, s.from = r.Header.Clone(), ""
		if server.Peer(r) {
			s.from = r.TLS.VerifiedChains[0][0].Subject.CommonName
		}
		s.mu.Unlock()
		h.ServeHTTP(w, r)
	})
}

// Two hosts on one database: a call to host-b about host-a's machine reaches host-a's
// peer listener over mutual TLS, without the caller's token and with the identity
// host-b checked, which host-a then holds the call to.
func TestForwardCarriesTheIdentityNotTheToken(t *testing.T) {
	ctx := context.Background()
	db, err := sqlstore.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	db.CreateApp(ctx, "web")
	db.CreateApp(ctx, "shop")
	for _, m := range []store.Machine{{ID: "m1", App: "web", Host: "host-a"}, {ID: "m2", App: "shop", Host: "host-a"}} {
		m.Name, m.State, m.Config = m.ID, machine.Created, []byte(`{"image":"x"}`)
		db.CreateMachine(ctx, m, machine.Event{Type: "launch", Source: "user"})
	}
	cred, _ := clusterauth.New()
	host := func(name string) (*server.Server, *clusterauth.Link) {
		l, err := cred.Link(name, "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		offer := capacity.Host{Name: name, CPUs: 4, MemoryMiB: 4096, CPURatio: 1, MemRatio: 1}
		ms := machines.New(machines.Config{Store: db, Dir: t.TempDir()})
		t.Cleanup(ms.Close)
		return &server.Server{Store: db, Node: ms, Auth: opAuth, Peers: l.Transport(),
			Cluster: cluster.New(cluster.Config{Store: db, Here: offer, Shared: true, Ledger: capacity.NewLedger(offer)})}, l
	}
	a, linkA := host("host-a")
	aLogs := newLogSink()
	a.Log = slog.New(slog.NewJSONHandler(aLogs, nil))
	var atA seen
	// httptest's TLS server would put its own certificate first: serve as kiln does.
	ln, err := tls.Listen("tcp", "127.0.0.1:0", linkA.ServerTLS())
	if err != nil {
		t.Fatal(err)
	}
	peerA := &http.Server{Handler: atA.wrap(a.Handler()), ErrorLog: log.New(io.Discard, "", 0)}
	go peerA.Serve(ln)
	defer peerA.Close()
	peerURL := "https://" + ln.Addr().String()
	b, _ := host("host-b")
	bAPI := httptest.NewServer(b.Handler())
	defer bAPI.Close()
	a.Cluster = cluster.New(cluster.Config{Store: db, Here: capacity.Host{Name: "host-a", CPUs: 4, MemoryMiB: 4096, CPURatio: 1, MemRatio: 1},
		PeerURL: peerURL, Shared: true, Ledger: capacity.NewLedger(capacity.Host{Name: "host-a"})})
	for _, c := range []*cluster.Cluster{a.Cluster, b.Cluster} {
		if err := c.Join(ctx); err != nil {
			t.Fatal(err)
		}
	}

	call := func(path, token string) (int, string) {
		req, _ := http.NewRequest("GET", bAPI.URL+path, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		req.Header.Set("Cookie", "session=secret")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	// A token narrowed to reading app web.
	readWeb := authtest.Issue(opAuth, "tok_readweb", auth.RoleCaveat(auth.Read), auth.ScopeCaveat(auth.App("web")))
	if code, body := call("/v1/apps/web/machines/m1", readWeb); code != http.StatusOK {
		t.Fatalf("GET host-a's machine through host-b: %d %s", code, body)
	}
	atA.mu.Lock()
	h, from := atA.header, atA.from
	atA.mu.Unlock()
	if from != "host-b" || h.Get("Authorization") != "" || h.Get("Cookie") != "" || h.Get("Kiln-Forwarded-By") != "host-b" {
		t.Fatalf("host-a got a call from %q with Authorization %q, Cookie %q, forwarded by %q", from, h.Get("Authorization"), h.Get("Cookie"), h.Get("Kiln-Forwarded-By"))
	}
	var id auth.Identity
	if err := json.Unmarshal([]byte(h.Get("Kiln-Identity")), &id); err != nil || id.Role != auth.Read || !id.Limited || !id.Reaches(auth.App("web")) || id.Reaches(auth.App("shop")) {
		t.Fatalf("host-a got identity %+v (%v), want read on app:web", id, err)
	}

	// The call's id goes with it: host-a's lines about it carry the id host-b answered with,
	// not one host-a would make of what the client sent.
	req, _ := http.NewRequest("GET", bAPI.URL+"/v1/apps/web/machines/m1", nil)
	req.Header.Set("Authorization", "Bearer "+readWeb)
	req.Header.Set("X-Request-Id", "not an id") // host-b replaces it; host-a must not see it
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	ids := resp.Header.Values("Kiln-Request-Id")
	if len(ids) != 1 || ids[0] == "" {
		t.Fatalf("a forwarded call answered with ids %q, want one", ids)
	}
	atA.mu.Lock()
	h = atA.header
	atA.mu.Unlock()
	if got := h.Get("Kiln-Request-Id"); got != ids[0] || h.Get("X-Request-Id") != "" {
		t.Fatalf("host-a got request id %q (X-Request-Id %q), want host-b's %q", got, h.Get("X-Request-Id"), ids[0])
	}
	aLogs.waitLine(t, map[string]any{"request_id": ids[0], "forwarded_by": "host-b", "status": float64(200)})

	// Another app's machine on the other host, asked for under the caller's own app, is
	// not forwarded: it answers as an unknown ID does, naming no host, even when the
	// caller claims the call was forwarded already.
	for _, hdr := range []string{"", "host-x"} {
		req, _ := http.NewRequest("GET", bAPI.URL+"/v1/apps/web/machines/m2", nil)
		req.Header.Set("Authorization", "Bearer "+readWeb)
		if hdr != "" {
			req.Header.Set("Kiln-Forwarded-By", hdr)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound || strings.Contains(string(body), "host-a") || !strings.Contains(string(body), "machine m2 does not exist") {
			t.Errorf("web's token asking for shop's machine on host-a (forwarded-by %q): %d %s", hdr, resp.StatusCode, body)
		}
	}

	// host-a holds a forwarded call to the identity it carries, not to a host's rights.
	_, linkB := host("host-b2")
	for path, want := range map[string]int{"/v1/apps/web/machines/m1": http.StatusOK, "/v1/apps/shop/machines/m2": http.StatusNotFound} {
		req, _ := http.NewRequest("GET", peerURL+path, nil)
		req.Header.Set("Kiln-Identity", h.Get("Kiln-Identity"))
		resp, err := (&http.Client{Transport: linkB.Transport()}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != want {
			t.Fatalf("%s at host-a's peer listener as read on app:web: %d, want %d", path, resp.StatusCode, want)
		}
		resp.Body.Close()
	}

	// Straight to host-a's peer listener, without a cluster certificate: refused in the
	// handshake, whatever the request says.
	plain := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: cred.Pool()}}}
	preq, _ := http.NewRequest("GET", peerURL+"/v1/apps/shop/machines/m2", nil)
	preq.Header.Set("Kiln-Identity", `{"token_id":"admin","role":4}`)
	if resp, err := plain.Do(preq); err == nil {
		resp.Body.Close()
		t.Fatalf("host-a's peer listener answered a client without a certificate: %d", resp.StatusCode)
	}
}
