package server_test

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/kilnhq/kiln/internal/server"
)

// The console is served on the API's address without a token (it is static files; the
// page sends the token with each API call), and /ui leads to it.
func TestConsoleMounted(t *testing.T) {
	srv := httptest.NewServer((&server.Server{Auth: opAuth}).Handler())
	defer srv.Close()
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	res, err := noRedirect.Get(srv.URL + "/ui")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode/100 != 3 || res.Header.Get("Location") != "/ui/" {
		t.Errorf("GET /ui: %d to %q, want a redirect to /ui/", res.StatusCode, res.Header.Get("Location"))
	}
	res, err = http.Get(srv.URL + "/ui/")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 || res.Header.Get("Content-Security-Policy") == "" {
		t.Errorf("GET /ui/: %d, CSP %q", res.StatusCode, res.Header.Get("Content-Security-Policy"))
	}
}
