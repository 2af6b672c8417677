package main_test

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// requireJSONLines fails unless every line the server wrote on stderr is one JSON
// record with a time, a level and a message (--log-format json).
func requireJSONLines(t *testing.T, logs string) {
	t.Helper()
	n := 0
	for _, l := range strings.Split(strings.TrimSpace(logs), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(l), &rec); err != nil {
			t.Errorf("stderr line is not JSON (%v): %s", err, l)
			continue
		}
		for _, k := range []string{"time", "level", "msg"} {
			if _, ok := rec[k]; !ok {
				t.Errorf("stderr record has no %s: %s", k, l)
			}
		}
		n++
	}
	if n == 0 {
		t.Error("the server wrote no log lines")
	}
}

// logRecords are the server's JSON records whose attributes include want.
func logRecords(logs string, want map[string]any) []map[string]any {
	var out []map[string]any
lines:
	for _, l := range strings.Split(logs, "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(l), &rec) != nil {
			continue
		}
		for k, v := range want {
			if rec[k] != v {
				continue lines
			}
		}
		out = append(out, rec)
	}
	return out
}

// A server with log-format json (here from its config file; TestExecBoundedMemory gives
// the flag) writes nothing on stderr but JSON records, from its start to its stop,
// through calls that succeed, are refused and name no route, and the access line of a
// call carries the request id it answered with.
func TestServerLogsJSON(t *testing.T) {
	e := newEnv(t)
	conf := filepath.Join(t.TempDir(), "server.toml")
	if err := os.WriteFile(conf, []byte("log-format = \"json\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, e, freeAddr(t), "--proxy-listen", "off", "--network=false", "--config", conf)
	defer stopOnFailure(&srv)
	token := readToken(t, filepath.Join(e.dataDir, "admin-token"))
	for _, c := range []struct {
		path, token string
		want        int
	}{
		{"/v1/apps", token, 200},
		{"/v1/apps", "", 401},
		{"/v1/no-such-route", token, 404},
	} {
		req, _ := http.NewRequest("GET", srv.url+c.path, nil)
		if c.token != "" {
			req.Header.Set("Authorization", "Bearer "+c.token)
		}
		req.Header.Set("Kiln-Request-Id", "json-test-1")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want || resp.Header.Get("Kiln-Request-Id") != "json-test-1" {
			t.Fatalf("GET %s: %d with request id %q, want %d and json-test-1", c.path, resp.StatusCode, resp.Header.Get("Kiln-Request-Id"), c.want)
		}
	}
	waitFor(t, func() bool {
		return len(logRecords(srv.logs.String(), map[string]any{"request_id": "json-test-1", "msg": "api call"})) == 2
	}, "the access lines of the two routed calls")
	srv.stop(syscall.SIGTERM)
	logs := srv.logs.String()
	srv = nil
	requireJSONLines(t, logs)
	if len(logRecords(logs, map[string]any{"msg": "stopped; machines keep running and are adopted at the next start"})) != 1 {
		t.Errorf("no record of the stop:\n%s", logs)
	}
}

// execWithRequestID runs an exec in machine id as a call with Kiln-Request-Id rid, and
// checks that the server's lines about it and the guest agent's line on the VM's
// console carry rid.
func execWithRequestID(t *testing.T, srv *kilnServer, token, app, id, rid string) {
	t.Helper()
	req, _ := http.NewRequest("POST", srv.url+"/v1/apps/"+app+"/machines/"+id+"/exec",
		strings.NewReader(`{"command":["sh","-c","echo traced"]}`))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Kiln-Request-Id", rid)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Kiln-Request-Id") != rid {
		t.Fatalf("exec: %d with request id %q, want 200 and %s", resp.StatusCode, resp.Header.Get("Kiln-Request-Id"), rid)
	}
	waitFor(t, func() bool {
		logs := srv.logs.String()
		return len(logRecords(logs, map[string]any{"request_id": rid, "msg": "api call", "route": "/v1/apps/{app}/machines/{id}/exec", "status": float64(200)})) == 1 &&
			len(logRecords(logs, map[string]any{"request_id": rid, "msg": "exec", "machine": id, "program": "sh"})) == 1
	}, "the server's lines about exec "+rid)
	// The agent's line reaches the host on the VM's console (this test runs one VM).
	waitFor(t, func() bool {
		consoles, _ := filepath.Glob(filepath.Join(srv.e.dataDir, "vms", "*", "console.log"))
		for _, c := range consoles {
			if b, _ := os.ReadFile(c); strings.Contains(string(b), `kiln-init: exec "sh" request_id=`+rid) {
				return true
			}
		}
		return false
	}, "the guest agent's line about exec "+rid+" on the console")
}
