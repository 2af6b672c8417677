// Package registry is kiln's built-in OCI registry: the distribution project's registry
// (the reference implementation behind Docker Hub's, with real garbage collection and
// disk storage), served from a directory under the data dir. kiln mounts it at /v2/ on
// its API address, so images pushed there are what machines run.
package registry

import (
	"context"
	"crypto/subtle"
	"io"
	"net/http"
	"strings"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/sirupsen/logrus"

	"github.com/kilnhq/kiln/internal/connlimit"
)

// Handler serves the OCI distribution API (/v2/...) with blobs and manifests stored
// under dir. Clients authenticate with kiln's API token, as a bearer token or as the
// password of HTTP basic authentication (what docker login and BuildKit send).
func Handler(ctx context.Context, dir, token string) http.Handler {
	app := newApp(ctx, dir)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !authorized(r, token) {
			w.Header().Set("WWW-Authenticate", `Basic realm="kiln"`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"log in with kiln's API token as the password"}]}`)
			return
		}
		// A push may idle between blobs: an authenticated client is never shed.
		connlimit.Trust(r.Context())
		app.ServeHTTP(w, r)
	})
}

func authorized(r *http.Request, token string) bool {
	if token == "" {
		return false
	}
	got := ""
	if _, pw, ok := r.BasicAuth(); ok {
		got = pw
	} else if b, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		got = b
	}
	return subtle.ConstantTimeCompare([]byte(got), []byte(token)) == 1
}

func newApp(ctx context.Context, dir string) http.Handler {
	cfg := &configuration.Configuration{
		Version: "0.1",
		Storage: configuration.Storage{
			"filesystem": configuration.Parameters{"rootdirectory": dir},
			"delete":     configuration.Parameters{"enabled": true},
			"maintenance": configuration.Parameters{
				"uploadpurging": map[any]any{"enabled": false},
			},
		},
	}
	cfg.Log.Level = "error"
	cfg.Log.AccessLog.Disabled = true
	logrus.SetOutput(io.Discard)
	return handlers.NewApp(ctx, cfg)
}
