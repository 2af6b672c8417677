package ui_test

import (
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/net/html"

	"github.com/kilnhq/kiln/internal/ui"
)

func get(t *testing.T, h http.Handler, method, path string) (*http.Response, string) {
	t.Helper()
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(method, path, nil))
	res := w.Result()
	b, _ := io.ReadAll(res.Body)
	return res, string(b)
}

// The page is served at the prefix with headers that keep a script injected through
// tenant text from running, framing the page, or sending anything to another origin.
func TestIndexHeaders(t *testing.T) {
	h := ui.Handler()
	for _, path := range []string{"/ui/", "/ui/app.js", "/ui/nope"} {
		res, _ := get(t, h, "GET", path)
		csp := res.Header.Get("Content-Security-Policy")
		for _, want := range []string{"default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'", "form-action 'none'"} {
			if !strings.Contains(csp, want) {
				t.Errorf("%s: CSP %q lacks %q", path, csp, want)
			}
		}
		if strings.Contains(csp, "unsafe-") {
			t.Errorf("%s: CSP allows unsafe sources: %q", path, csp)
		}
		for k, v := range map[string]string{"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"} {
			if got := res.Header.Get(k); got != v {
				t.Errorf("%s: %s = %q, want %q", path, k, got, v)
			}
		}
	}
	res, body := get(t, h, "GET", "/ui/")
	if res.StatusCode != 200 || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/html") || !strings.Contains(body, `src="app.js"`) {
		t.Errorf("GET /ui/: %d %q\n%s", res.StatusCode, res.Header.Get("Content-Type"), body)
	}
	// With nosniff, a module whose type is not JavaScript is refused by the browser.
	if res, _ := get(t, h, "GET", "/ui/app.js"); res.StatusCode != 200 || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/javascript") {
		t.Errorf("GET /ui/app.js: %d %q", res.StatusCode, res.Header.Get("Content-Type"))
	}
}

func TestUnknownPaths(t *testing.T) {
	h := ui.Handler()
	for _, path := range []string{"/ui/nope.js", "/ui/static/index.html", "/ui/./app.js", "/ui/x/../app.js", "/ui//app.js", "/ui/.", "/uix", "/v1/apps"} {
		if res, _ := get(t, h, "GET", path); res.StatusCode != 404 {
			t.Errorf("GET %s: %d, want 404", path, res.StatusCode)
		}
	}
	if res, _ := get(t, h, "POST", "/ui/"); res.StatusCode != 405 {
		t.Errorf("POST /ui/: %d, want 405", res.StatusCode)
	}
}

// The CSP forbids inline script; the page must not need any. Inline handlers and
// style attributes would be refused the same way.
func TestNoInlineScript(t *testing.T) {
	files := embedded(t)
	for name, body := range files {
		if !strings.HasSuffix(name, ".html") {
			continue
		}
		doc, err := html.Parse(strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		for n := range doc.Descendants() {
			if n.Type != html.ElementNode {
				continue
			}
			attrs := map[string]string{}
			for _, a := range n.Attr {
				attrs[a.Key] = a.Val
				if strings.HasPrefix(a.Key, "on") || a.Key == "style" {
					t.Errorf("%s: <%s %s=...> is inline code or style, which the CSP refuses", name, n.Data, a.Key)
				}
				if strings.HasPrefix(strings.TrimSpace(strings.ToLower(a.Val)), "javascript:") {
					t.Errorf("%s: <%s %s=%q>", name, n.Data, a.Key, a.Val)
				}
			}
			switch n.Data {
			case "script":
				if attrs["src"] == "" || n.FirstChild != nil {
					t.Errorf("%s: an inline <script>", name)
				} else if _, ok := files[attrs["src"]]; !ok {
					t.Errorf("%s: <script src=%q> is not embedded", name, attrs["src"])
				}
			case "style":
				t.Errorf("%s: an inline <style>", name)
			case "link":
				if _, ok := files[attrs["href"]]; !ok {
					t.Errorf("%s: <link href=%q> is not embedded", name, attrs["href"])
				}
			}
		}
	}
}

// Tenant text (machine names, log lines, errors) only ever becomes text: no script
// turns strings into markup or code, and every module it imports is embedded (there is
// no bundler to catch a missing one).
func TestScriptsMakeNoMarkup(t *testing.T) {
	files := embedded(t)
	sinks := regexp.MustCompile(`\b(innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval|Function|setHTMLUnsafe|createContextualFragment)\b\s*[=(]`)
	imports := regexp.MustCompile(`(?m)^\s*(?:import|export)\b[^"']*\bfrom\s+["']\./([^"']+)["']`)
	scripts := 0
	for name, body := range files {
		if !strings.HasSuffix(name, ".js") {
			continue
		}
		scripts++
		if m := sinks.FindString(body); m != "" {
			t.Errorf("%s: %q would parse text as markup or code", name, m)
		}
		for _, m := range imports.FindAllStringSubmatch(body, -1) {
			if _, ok := files[m[1]]; !ok {
				t.Errorf("%s imports ./%s, which is not embedded", name, m[1])
			}
		}
	}
	if scripts == 0 {
		t.Fatal("no scripts embedded")
	}
}

// embedded reads every file the handler serves, through the handler.
func embedded(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := fs.WalkDir(ui.Files, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		res, body := get(t, ui.Handler(), "GET", ui.Prefix+p)
		if res.StatusCode != 200 {
			t.Errorf("GET %s%s: %d", ui.Prefix, p, res.StatusCode)
		}
		out[p] = body
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
