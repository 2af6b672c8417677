// Package ui is kiln's web console: static files embedded in the binary and served at
// /ui/ on the API's address. The page calls the API from the browser with the token the
// user signs in with; nothing here holds or checks a token, so the files are public.
package ui

import (
	"bytes"
	"embed"
	"io/fs"
	"net/http"
	"path"
	"strings"
	"time"
)

//go:embed static
var static embed.FS

// Files is the console's tree as served: index.html, its modules and its style.
var Files, _ = fs.Sub(static, "static")

// Prefix is where the console is served.
const Prefix = "/ui/"

// CSP lets the page run only its own files and talk only to its own origin: API
// answers carry tenant-controlled text (machine names, logs, errors), and if some of it
// ever reached the DOM as markup, an injected script still could not run or send the
// token anywhere. form-action 'none' keeps a sign-in form from ever submitting the token
// in a URL, even if the page's script failed to load.
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
	"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Handler serves the console's files under Prefix: index.html at the prefix itself, each
// embedded file at its name, 404 for anything else (there is no directory listing).
func Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", CSP)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		// A new kiln binary brings new files: the browser revalidates instead of mixing
		// an old module with a new one.
		h.Set("Cache-Control", "no-cache")
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			h.Set("Allow", "GET, HEAD")
			http.Error(w, "the console's files are read with GET", http.StatusMethodNotAllowed)
			return
		}
		name, ok := strings.CutPrefix(r.URL.Path, Prefix)
		if !ok {
			http.NotFound(w, r)
			return
		}
		if name == "" {
			name = "index.html"
		}
		b, err := fs.ReadFile(Files, name)
		if err != nil || name != path.Clean(name) {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(b))
	})
}
