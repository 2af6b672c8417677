package main_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"database/sql"
	"encoding/hex"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/clusterauth"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// secretOf is what a host joining a cluster is given: a copy of the secret the
// cluster's first host (whose env is first) wrote to its data directory when it made
// the cluster. A copy, as an operator would make: a server whose command line named
// another host's data directory would die with that host's processes in the tests.
func secretOf(t *testing.T, first *env) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(first.dataDir, clusterauth.SecretFile))
	if err != nil {
		t.Fatalf("the first host's cluster secret: %v", err)
	}
	p := filepath.Join(t.TempDir(), "cluster-secret")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"--cluster-secret-file", p}
}

// dumpDatabase returns every row of every table of the PostgreSQL database, each as
// PostgreSQL writes a row as text (bytea in hex).
func dumpDatabase(t *testing.T, dsn string) string {
	t.Helper()
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.Query(`SELECT tablename FROM pg_tables WHERE schemaname = 'public'`)
	if err != nil {
		t.Fatal(err)
	}
	var tables []string
	for rows.Next() {
		var name string
		rows.Scan(&name)
		tables = append(tables, name)
	}
	rows.Close()
	if len(tables) < 10 {
		t.Fatalf("the database has tables %v: not kiln's", tables)
	}
	var all strings.Builder
	for _, table := range tables {
		var text sql.NullString
		if err := db.QueryRow(`SELECT string_agg(t::text, E'\n') FROM "` + table + `" t`).Scan(&text); err != nil {
			t.Fatalf("dumping %s: %v", table, err)
		}
		all.WriteString(table + ":\n" + text.String + "\n")
	}
	return all.String()
}

// peerURLOf reads where a host registered its peer listener.
func peerURLOf(t *testing.T, dsn, host string) string {
	t.Helper()
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var u string
	if err := db.QueryRow(`SELECT peer_url FROM hosts WHERE name = $1`, host).Scan(&u); err != nil || !strings.HasPrefix(u, "https://") {
		t.Fatalf("host %s's peer URL %q: %v", host, u, err)
	}
	return u
}

// refusedStart runs `kiln server` on the database, which must refuse to start; it
// returns what it said.
func refusedStart(t *testing.T, dsn string, extra ...string) string {
	t.Helper()
	e := newEnv(t)
	c := e.cmd(append([]string{"server", "--listen", freeAddr(t), "--db", dsn, "--host-name", "host-c", "--proxy-listen", "off", "--network=false"}, extra...)...)
	var errb bytes.Buffer
	c.Stderr = &errb
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatalf("kiln server %v started and stopped without an error:\n%s", extra, errb.String())
		}
	case <-time.After(time.Minute):
		c.Process.Kill()
		<-done
		t.Fatalf("kiln server %v started on a cluster it has no secret of:\n%s", extra, errb.String())
	}
	if _, err := os.Stat(filepath.Join(e.dataDir, "admin-token")); err == nil {
		t.Errorf("the refused host wrote an admin token")
	}
	return errb.String()
}

// checkHostLinks holds a running two-host cluster (a made it, ea is its env; m runs
// on a) to what issue 13 asks of host links: a token created on one host works through
// the other, forwarded; no token and no secret is in the database in clear; a host
// without the cluster's secret, or with another's, does not start; the peer listener
// lets in only the cluster's hosts, and the API believes no identity header. A token
// revoked on one host is refused by the other within 2 s.
func checkHostLinks(t *testing.T, dsn string, ea *env, a, b *kilnServer, app, machineID string) {
	t.Helper()
	ctx := context.Background()
	out, errs, code := a.kiln("", "tokens", "create", "--app", app, "--role", "read", "--expiry", "1h")
	tok := strings.TrimSpace(out)
	if code != 0 || !strings.HasPrefix(tok, "kiln1_") {
		t.Fatalf("tokens create: %d %q %s", code, out, errs)
	}
	id := strings.TrimSuffix(strings.Fields(strings.TrimPrefix(errs, "token "))[0], ":")
	// Made on host-a, used on host-b, about host-a's machine: host-b checks it with the
	// cluster's key and forwards only the identity.
	readB := client.New(b.url, tok)
	if got, err := readB.GetMachine(ctx, app, machineID); err != nil || got.ID != machineID {
		t.Fatalf("a read token from host-a, through host-b: %+v %v", got, err)
	}
	if _, err := readB.Exec(ctx, app, machineID, []string{"true"}, "", 10*time.Second); !errors.Is(err, errdefs.ErrForbidden) {
		t.Fatalf("a read token ran exec through host-b: %v", err)
	}

	// Nothing token-like in clear: not the operator's token, not the one just made, not
	// the cluster's secret, as text or in hex.
	secret, err := os.ReadFile(filepath.Join(ea.dataDir, clusterauth.SecretFile))
	if err != nil {
		t.Fatal(err)
	}
	dump := dumpDatabase(t, dsn)
	for what, s := range map[string]string{"the operator's token": readToken(t, filepath.Join(ea.dataDir, "admin-token")),
		"a created token": tok, "the cluster secret": strings.TrimSpace(string(secret))} {
		if strings.Contains(dump, s) || strings.Contains(dump, hex.EncodeToString([]byte(s))) {
			t.Errorf("%s is in the database in clear", what)
		}
	}
	if !strings.Contains(dump, "host-a") || !strings.Contains(dump, id) {
		t.Fatalf("the dump misses what it should show:\n%.2000s", dump)
	}

	if !strings.Contains(a.logs.String(), "a host joining the cluster needs a copy") {
		t.Errorf("host-a does not say where its cluster secret is:\n%s", a.logs.String())
	}
	// A host without the cluster's secret, or with another cluster's, does not start.
	if said := refusedStart(t, dsn); !strings.Contains(said, "lacks the cluster's secret") ||
		!strings.Contains(said, "copy DATA_DIR/cluster-secret from a host of the cluster") || !strings.Contains(said, "--cluster-secret-file") {
		t.Errorf("a host without the secret said:\n%s", said)
	}
	wrong := filepath.Join(t.TempDir(), "secret")
	clusterauth.WriteSecret(wrong, clusterauth.NewSecret())
	if said := refusedStart(t, dsn, "--cluster-secret-file", wrong); !strings.Contains(said, "another cluster's") || !strings.Contains(said, "--cluster-secret-file") {
		t.Errorf("a host with a wrong secret said:\n%s", said)
	}

	// host-a's peer listener: a client without a certificate, or with one of another
	// cluster's CA, gets no answer (the client here skips checking the server, so the
	// refusal is the listener's).
	peer := peerURLOf(t, dsn, "host-a")
	other, _ := clusterauth.New()
	stranger, _ := other.Link("host-x", "127.0.0.1")
	strangerTLS := stranger.ClientTLS()
	strangerTLS.RootCAs, strangerTLS.InsecureSkipVerify = nil, true
	for name, cfg := range map[string]*tls.Config{"no certificate": {InsecureSkipVerify: true}, "another cluster's certificate": strangerTLS} {
		req, _ := http.NewRequest("GET", peer+"/v1/apps", nil)
		req.Header.Set("Kiln-Identity", `{"token_id":"admin","role":4}`)
		resp, err := (&http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}).Do(req)
		if err == nil {
			resp.Body.Close()
			t.Errorf("host-a's peer listener answered a client with %s: %d", name, resp.StatusCode)
		} else if !strings.Contains(err.Error(), "tls: ") {
			t.Errorf("a client with %s: %v, want a refusal in the TLS handshake", name, err)
		}
	}
	// The API's own listener believes no identity a caller claims.
	req, _ := http.NewRequest("GET", a.url+"/v1/apps", nil)
	req.Header.Set("Kiln-Identity", `{"token_id":"admin","role":4}`)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("a forged Kiln-Identity on host-a's API: %d, want 401", resp.StatusCode)
	}

	// Revoked on host-a, refused by host-b within 2 s.
	if _, errs, code := a.kiln("", "tokens", "revoke", id); code != 0 {
		t.Fatalf("tokens revoke: %s", errs)
	}
	revoked := time.Now()
	for {
		_, err := readB.GetMachine(ctx, app, machineID)
		if errors.Is(err, errdefs.ErrUnauthenticated) {
			break
		}
		if time.Since(revoked) > 2*time.Second {
			t.Fatalf("host-b still takes a token revoked on host-a %s ago: %v", time.Since(revoked).Round(time.Millisecond), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
