package client_test

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
)

// failingReader gives some bytes, then fails as a local file that cannot be read would.
type failingReader struct {
	sent bool
	err  error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if !f.sent {
		f.sent = true
		return copy(p, "partial context"), nil
	}
	return 0, f.err
}

// A context that cannot be read ends the upload; the caller hears why, not that the
// server cannot be reached.
func TestSubmitBuildReportsTheContextsError(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		http.Error(w, `{"error":"the build context is not a valid tar stream"}`, http.StatusBadRequest)
	}))
	defer srv.Close()
	local := errors.New("open ctx/secret.key: permission denied")
	_, err := client.New(srv.URL, "").SubmitBuild(t.Context(), "p", api.BuildSpec{}, &failingReader{err: local}, nil)
	if !errors.Is(err, local) {
		t.Fatalf("got %v, want the context's own error", err)
	}
	if strings.Contains(err.Error(), "cannot reach") {
		t.Errorf("a local error reported as a connection failure: %v", err)
	}
}
