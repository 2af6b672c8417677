package serverlog_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/kilnhq/kiln/internal/reqid"
	"github.com/kilnhq/kiln/internal/serverlog"
)

// records parses buf as JSON lines, failing on any line that is not one.
func records(t *testing.T, buf *bytes.Buffer) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("line %q is not JSON: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

func TestWriterMakesOneRecordPerLine(t *testing.T) {
	var buf bytes.Buffer
	l, err := serverlog.New(&buf, "json")
	if err != nil {
		t.Fatal(err)
	}
	w := serverlog.Writer(l)
	fmt.Fprintf(w, "kiln: proxy: serving %q\n", `a "quoted" name`)
	w.Write([]byte("first half, "))
	w.Write([]byte("second half\nanother\n\n"))
	w.Write([]byte(strings.Repeat("x", 40<<10) + "\n"))
	got := records(t, &buf)
	want := []string{`proxy: serving "a \"quoted\" name"`, "first half, second half", "another"}
	for i, m := range want {
		if got[i]["msg"] != m || got[i]["level"] != "INFO" || got[i]["time"] == nil {
			t.Errorf("record %d: %v, want msg %q at INFO with a time", i, got[i], m)
		}
	}
	long := got[len(want):]
	if len(long) != 3 || len(long[0]["msg"].(string)) != 16<<10 {
		t.Errorf("a 40 KiB line made %d records, want 3 of at most 16 KiB", len(long))
	}
}

func TestWriterConcurrentLinesStayWhole(t *testing.T) {
	var buf bytes.Buffer
	l, _ := serverlog.New(&buf, "json")
	w := serverlog.Writer(l)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for j := range 50 {
				fmt.Fprintf(w, "kiln: writer %d line %d\n", i, j)
			}
		})
	}
	wg.Wait()
	got := records(t, &buf)
	if len(got) != 400 {
		t.Fatalf("%d records, want 400", len(got))
	}
	for _, m := range got {
		if !strings.HasPrefix(m["msg"].(string), "writer ") {
			t.Fatalf("record %v mixes lines", m)
		}
	}
}

func TestNewRefusesUnknownFormat(t *testing.T) {
	if _, err := serverlog.New(&bytes.Buffer{}, "xml"); err == nil || !strings.Contains(err.Error(), "text or json") {
		t.Fatalf("err %v, want one naming text and json", err)
	}
}

func TestForCarriesTheRequestID(t *testing.T) {
	var buf bytes.Buffer
	base := slog.New(slog.NewJSONHandler(&buf, nil))
	serverlog.For(reqid.With(context.Background(), "test-123"), base).Info("hello")
	serverlog.For(context.Background(), base).Info("outside")
	serverlog.For(context.Background(), nil).Info("nowhere") // must not panic
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
