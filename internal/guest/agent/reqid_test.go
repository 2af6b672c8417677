package agent_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/guest/agent"
	"github.com/kilnhq/kiln/internal/reqid"
)

// lines collects an agent's log lines.
type lines struct {
	mu sync.Mutex
	l  []string
}

func (ls *lines) logf(format string, args ...any) {
	ls.mu.Lock()
	ls.l = append(ls.l, fmt.Sprintf(format, args...))
	ls.mu.Unlock()
}

func (ls *lines) all() []string {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	return append([]string(nil), ls.l...)
}

// The request id of the API call a request serves travels in its header, and the agent
// puts it on its one line about each exec, spawn and signal; a request made for no call
// has a line without one, and nothing else is logged.
func TestRequestIDReachesTheAgentsLog(t *testing.T) {
	var got lines
	c := connectWith(t, func(a *agent.Agent) { a.Log = got.logf })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	call := reqid.With(ctx, "test-123")

	if _, err := c.Exec(call, guest.ExecRequest{Argv: []string{"sh", "-c", "echo secret-argument >/dev/null"}}, guest.IO{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, guest.ExecRequest{Argv: []string{"true"}}, guest.IO{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Spawn(ctx, "workload", sh("sleep 30")); err != nil {
		t.Fatal(err)
	}
	if err := c.SignalSupervised(reqid.With(ctx, "sig-9"), "workload", 15); err != nil {
		t.Fatal(err)
	}
	// Not an id the host would send: it must not break the console's lines.
	if _, err := c.Exec(reqid.With(ctx, "x\nkiln-init: forged"), guest.ExecRequest{Argv: []string{"true"}}, guest.IO{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ps(call); err != nil {
		t.Fatal(err)
	}
	want := []string{
		`exec "sh" request_id=test-123`,
		`exec "true"`,
		`spawn "sh" as "workload"`,
		`signal 15 to "workload" request_id=sig-9`,
		`exec "true"`,
	}
	if l := got.all(); strings.Join(l, "\n") != strings.Join(want, "\n") {
		t.Fatalf("agent logged:\n%s\nwant:\n%s", strings.Join(l, "\n"), strings.Join(want, "\n"))
	}
}

// An agent from before Header.RequestID decodes a header that carries it: agents read
// headers leniently, which is what keeps the field inside protocol v1.
func TestOldAgentIgnoresRequestID(t *testing.T) {
	var b strings.Builder
	if err := guest.WriteFrame(&b, guest.Header{Version: guest.Version, Op: guest.OpExec, RequestID: "test-123"}); err != nil {
		t.Fatal(err)
	}
	var old struct {
		Version int      `json:"v"`
		Op      guest.Op `json:"op"`
	}
	if err := guest.ReadFrame(strings.NewReader(b.String()), &old); err != nil || old.Version != guest.Version || old.Op != guest.OpExec {
		t.Fatalf("an older agent read %+v (%v)", old, err)
	}
	var now guest.Header
	if err := guest.ReadFrame(strings.NewReader(b.String()), &now); err != nil || now.RequestID != "test-123" {
		t.Fatalf("this agent read %+v (%v)", now, err)
	}
}
