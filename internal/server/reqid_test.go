package server_test

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/auditlog"
	"github.com/kilnhq/kiln/internal/reqid"
	"github.com/kilnhq/kiln/internal/server"
)

// Every answer names its request id, the client's when it is a short safe token, and
// the call's access line carries it with what was called, by whom, and how it ended.
func TestRequestIDOnAnswerAndAccessLine(t *testing.T) {
	var logs bytes.Buffer
	h := oneMachineAPI(t, slog.New(slog.NewJSONHandler(&logs, nil))).Handler()

	for _, tc := range []struct {
		name, path, token string
		header            map[string]string
		wantID            string // "" wants a fresh one
		wantRoute         string // "" wants no access line
		wantStatus        int
	}{
		{"client's id", "/v1/apps/web/machines/m1", opToken, map[string]string{"Kiln-Request-Id": "test-123"}, "test-123", "/v1/apps/{app}/machines/{id}", 200},
		{"x-request-id", "/v1/apps/web/machines/m1", opToken, map[string]string{"X-Request-Id": "from-a-proxy"}, "from-a-proxy", "/v1/apps/{app}/machines/{id}", 200},
		{"hostile id", "/v1/apps/web/machines/m1", opToken, map[string]string{"Kiln-Request-Id": "x\" level=ERROR msg=\"forged\nnext"}, "", "/v1/apps/{app}/machines/{id}", 200},
		{"too long", "/v1/apps/web", opToken, map[string]string{"Kiln-Request-Id": strings.Repeat("a", 65)}, "", "/v1/apps/{app}", 200},
		{"no token", "/v1/apps/web", "", map[string]string{"Kiln-Request-Id": "anon-1"}, "anon-1", "/v1/apps/{app}", 401},
		{"public route", "/v1/openapi.json", "", nil, "", "/v1/openapi.json", 200},
		{"no route", "/v1/nothing-here", opToken, map[string]string{"Kiln-Request-Id": "lost-1"}, "lost-1", "", 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logs.Reset()
			req := httptest.NewRequest("GET", tc.path, nil)
			if tc.token != "" {
				req.Header.Set("Authorization", "Bearer "+tc.token)
			}
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			w := httptest.NewRecorder()
			h.ServeHTTP(w, req) // the access line is written before ServeHTTP returns
			if w.Code != tc.wantStatus {
				t.Fatalf("status %d, want %d: %s", w.Code, tc.wantStatus, w.Body)
			}
			ids := w.Result().Header.Values(reqid.Header)
			if len(ids) != 1 || !reqid.Valid(ids[0]) {
				t.Fatalf("answer's %s: %q, want one valid id", reqid.Header, ids)
			}
			id := ids[0]
			if tc.wantID != "" && id != tc.wantID {
				t.Fatalf("answer's id %q, want the client's %q", id, tc.wantID)
			}
			if tc.wantID == "" && tc.header != nil && id == tc.header["Kiln-Request-Id"] {
				t.Fatalf("the client's unsafe id came back")
			}
			lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
			if tc.wantRoute == "" {
				if logs.Len() != 0 {
					t.Fatalf("an unrouted call logged %q", logs.String())
				}
				return
			}
			if len(lines) != 1 {
				t.Fatalf("%d log lines, want one access line:\n%s", len(lines), logs.String())
			}
			var line map[string]any
			if err := json.Unmarshal([]byte(lines[0]), &line); err != nil {
				t.Fatalf("access line %q: %v", lines[0], err)
			}
			if line["request_id"] != id || line["method"] != "GET" || line["route"] != tc.wantRoute ||
				line["status"] != float64(tc.wantStatus) || line["duration"] == nil {
				t.Fatalf("access line %s: want request_id %s, GET %s, status %d and a duration", lines[0], id, tc.wantRoute, tc.wantStatus)
			}
			if tok, _ := line["token"].(string); (tok != "") != (tc.token != "") {
				t.Fatalf("access line's token %q for a call with token %v", tok, tc.token != "")
			}
		})
	}
}

// The id of a call is fresh for each call that brings none.
func TestRequestIDIsFreshPerCall(t *testing.T) {
	h := (&server.Server{Auth: opAuth}).Handler()
	seen := map[string]bool{}
	for range 20 {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("GET", "/v1/openapi.json", nil))
		id := w.Header().Get(reqid.Header)
		if seen[id] {
			t.Fatalf("id %q answered twice", id)
		}
		seen[id] = true
	}
}

// logSink collects log lines written from the server's goroutines; wrote says more came.
type logSink struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	wrote chan struct{}
}

func newLogSink() *logSink { return &logSink{wrote: make(chan struct{}, 1)} }

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	s.buf.Write(p)
	s.mu.Unlock()
	select {
	case s.wrote <- struct{}{}:
	default:
	}
	return len(p), nil
}

// waitLine waits for a JSON line whose attributes include want, and returns it.
func (s *logSink) waitLine(t *testing.T, want map[string]any) map[string]any {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		s.mu.Lock()
		text := s.buf.String()
		s.mu.Unlock()
	lines:
		for _, l := range strings.Split(text, "\n") {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) != nil {
				continue
			}
			for k, v := range want {
				if m[k] != v {
					continue lines
				}
			}
			return m
		}
		select {
		case <-s.wrote:
		case <-deadline:
			t.Fatalf("no log line with %v in:\n%s", want, text)
		}
	}
}

// Calls without a valid token get access lines up to a rate (anyone can send them as
// fast as the network allows); calls with one are all logged.
func TestAccessLinesOfAnonymousCallsAreBounded(t *testing.T) {
	var logs bytes.Buffer
	h := oneMachineAPI(t, slog.New(slog.NewJSONHandler(&logs, nil))).Handler()
	count := func(token string) int {
		logs.Reset()
		for range 200 {
			req := httptest.NewRequest("GET", "/v1/apps/web", nil)
			if token != "" {
				req.Header.Set("Authorization", "Bearer "+token)
			}
			h.ServeHTTP(httptest.NewRecorder(), req)
		}
		return strings.Count(logs.String(), `"msg":"api call"`)
	}
	// 200 calls take well under a second here, so they span at most two seconds' budgets.
	if n := count(""); n > 2*auditlog.DefaultAnonymousPerSecond {
		t.Errorf("%d access lines for 200 calls without a token, want at most %d", n, 2*auditlog.DefaultAnonymousPerSecond)
	}
	if n := count(opToken); n != 200 {
		t.Errorf("%d access lines for 200 calls with a token, want 200", n)
	}
}
