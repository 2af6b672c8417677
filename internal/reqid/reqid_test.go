package reqid_test

import (
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/reqid"
)

func TestChoose(t *testing.T) {
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
			choose := func() string { return reqid.Choose(r.Header.Values(reqid.Header), r.Header.Values(reqid.AltHeader)) }
			got := choose()
			if tc.want != "" {
				if got != tc.want {
					t.Fatalf("id %q, want %q", got, tc.want)
				}
				return
			}
			if !reqid.Valid(got) || got == choose() {
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
