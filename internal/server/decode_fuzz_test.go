package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// bodyTypes are the request bodies the handlers decode.
var bodyTypes = map[string]func() any{
	"CreateAppRequest":     func() any { return new(api.CreateAppRequest) },
	"CreateMachineRequest": func() any { return new(api.CreateMachineRequest) },
	"StopRequest":          func() any { return new(api.StopRequest) },
	"ExecRequest":          func() any { return new(api.ExecRequest) },
	"CreateVolumeRequest":  func() any { return new(api.CreateVolumeRequest) },
	"ExtendVolumeRequest":  func() any { return new(api.ExtendVolumeRequest) },
	"SignalRequest":        func() any { return new(api.SignalRequest) },
	"LeaseRequest":         func() any { return new(api.LeaseRequest) },
	"MetadataValue":        func() any { return new(api.MetadataValue) },
}

// decodeBody runs decode on body as a request's, returning how much of it was read.
func decodeBody(body []byte, v any) (int, error) {
	r := bytes.NewReader(body)
	err := decode(httptest.NewRequest("POST", "/", r), v)
	return len(body) - r.Len(), err
}

// Whatever a caller sends, decode reads at most maxBody bytes, answers an invalid-argument
// error (400) or a value, never panics, and accepts only a body that is one JSON value
// whose fields all exist.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"app_name":"web"}`,
		`{"name":"m1","config":{"image":"localhost/app:1","env":{"A":"b"},"guest":{"cpus":1,"memory_mb":256},` +
			`"mounts":[{"volume":"data","path":"/data"}],"restart":{"policy":"on-failure","max_retries":3},` +
			`"stop_config":{"timeout":"10s","signal":"SIGTERM"},"services":[{"protocol":"tcp","internal_port":8080,` +
			`"ports":[{"port":80,"handlers":["http"]}],"concurrency":{"type":"requests","soft_limit":1,"hard_limit":2},` +
			`"checks":[{"type":"http","interval":"1s","path":"/"}]}]}}`,
		`{"command":["cat","/etc/os-release"],"timeout":30,"stdin":"x"}`,
		`{"cmd":["sh","-c","exit 3"]}`,
		`{"name":"data","size_gb":1}`, `{"size_gb":-1}`, `{"signal":"SIGKILL"}`, `{"ttl":60}`, `{"value":"v"}`,
		// Not one value, or not JSON.
		``, ` `, `null`, `{}`, `{}{}`, `{} x`, `{}}`, `[]`, `"str"`, `{"app_name":"a"`, `{"app_name":"a"}` + "\n",
		// Unknown, duplicate and oddly cased fields; wrong types; numbers out of range.
		`{"nope":1}`, `{"app_name":"a","app_name":"b"}`, `{"APP_NAME":"a"}`, `{"app_name":1}`,
		`{"config":{"guest":{"cpus":1e400}}}`, `{"ttl":9223372036854775808}`, `{"size_gb":1.5}`, `{"timeout":-9223372036854775808}`,
		// Strings: invalid UTF-8, escaped NUL, lone surrogates.
		"{\"app_name\":\"\xff\xfe\"}", `{"app_name":"a\u0000b"}`, `{"app_name":"\ud800"}`, "{\"value\":\"\x00\"}",
		// Deep nesting, past encoding/json's depth limit.
		`{"config":{"env":` + strings.Repeat(`{"a":`, 20000) + `1` + strings.Repeat(`}`, 20000) + `}}`,
		`{"command":` + strings.Repeat(`[`, 20000) + strings.Repeat(`]`, 20000) + `}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		for name, newV := range bodyTypes {
			v := newV()
			n, err := decodeBody(body, v)
			if n > maxBody+1 {
				t.Errorf("%s: decode read %d bytes of the body, over the %d-byte cap", name, n, maxBody)
			}
			if err != nil {
				if !errors.Is(err, errdefs.ErrInvalid) {
					t.Errorf("%s: error is not classified invalid: %v", name, err)
				}
				continue
			}
			if !json.Valid(body) {
				t.Errorf("%s: accepted a body that is not one JSON value: %q", name, body)
			}
			// What was accepted reads back the same: nothing decoded is unencodable.
			out, err := json.Marshal(v)
			if err != nil {
				t.Fatalf("%s: encoding what decode accepted: %v", name, err)
			}
			again := newV()
			if _, err := decodeBody(out, again); err != nil {
				t.Fatalf("%s: decoding %s again: %v", name, out, err)
			}
			if out2, _ := json.Marshal(again); !bytes.Equal(out, out2) {
				t.Errorf("%s: round trip changed %s into %s", name, out, out2)
			}
		}
	})
}

// A body over the cap is refused as such, after reading no more than the cap, whether it
// is one long value or a small one followed by padding.
func TestDecodeCapsTheBody(t *testing.T) {
	for name, body := range map[string]string{
		"long value": `{"app_name":"` + strings.Repeat("a", 2*maxBody) + `"}`,
		"padding":    `{"app_name":"a"}` + strings.Repeat(" ", 2*maxBody),
	} {
		n, err := decodeBody([]byte(body), new(api.CreateAppRequest))
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "over 1024 KiB") {
			t.Errorf("%s: %v; want an invalid-argument error saying the body is over 1024 KiB", name, err)
		}
		if n > maxBody+1 {
			t.Errorf("%s: read %d bytes, over the %d-byte cap", name, n, maxBody)
		}
	}
}
