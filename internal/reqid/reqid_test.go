package reqid_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/reqid"
)

func TestFromRequest(t *testing.T) {
	long := strings.Repeat("a", reqid.MaxLen+1)
	for _, tc := range []struct {
		name   string
		header map[string][]string
		want   string // "" means a fresh id
	}{
		{"kiln header", map[string][]string{"Kiln-Request-Id": {"test-123"}}, "test-123"},
		{"x header", map[string][]string{"X-Request-Id": {"abc.DEF_9"}}, "abc.DEF_9"},
		{"kiln header wins", map[string][]string{"Kiln-Request-Id": {"one"}, "X-Request-Id": {"two"}}, "one"},
		{"longest allowed", map[string][]string{"Kiln-Request-Id": {long[1:]}}, long[1:]},
		{"none", nil, ""},
		{"too long", map[string][]string{"Kiln-Request-Id": {long}}, ""},
		{"newline", map[string][]string{"Kiln-Request-Id": {"a\nlevel=ERROR msg=forged"}}, ""},
		{"quote", map[string][]string{"Kiln-Request-Id": {`a" msg="x`}}, ""},
		{"space", map[string][]string{"X-Request-Id": {"a b"}}, ""},
		{"two values", map[string][]string{"Kiln-Request-Id": {"a", "b"}}, ""},
		{"bad kiln header is not excused by a good x header", map[string][]string{"Kiln-Request-Id": {"a b"}, "X-Request-Id": {"ok"}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "/", nil)
			for k, v := range tc.header {
				r.Header[k] = v
			}
			got := reqid.FromRequest(r)
			if tc.want != "" {
				if got != tc.want {
					t.Fatalf("id %q, want %q", got, tc.want)
				}
				return
			}
			if !reqid.Valid(got) || got == reqid.FromRequest(r) {
				t.Fatalf("id %q: want a fresh, valid, random id", got)
			}
			for _, v := range tc.header {
				if got == v[0] {
					t.Fatalf("the client's id %q was used", got)
				}
			}
		})
	}
}

func TestLoggerCarriesTheID(t *testing.T) {
	var buf bytes.Buffer
	base := slog.New(slog.NewJSONHandler(&buf, nil))
	reqid.Logger(reqid.With(context.Background(), "test-123"), base).Info("hello")
	reqid.Logger(context.Background(), base).Info("outside")
	reqid.Logger(context.Background(), nil).Info("nowhere") // must not panic
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines, want 2:\n%s", len(lines), buf.String())
	}
	var in, out map[string]any
	json.Unmarshal([]byte(lines[0]), &in)
	json.Unmarshal([]byte(lines[1]), &out)
	if in[reqid.Attr] != "test-123" {
		t.Errorf("line in a call: %s, want request_id test-123", lines[0])
	}
	if _, ok := out[reqid.Attr]; ok {
		t.Errorf("line outside a call carries a request id: %s", lines[1])
	}
}
