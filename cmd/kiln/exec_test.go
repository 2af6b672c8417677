package main_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/image/imagetest"
)

// vmRSS is a process's resident memory in bytes, from /proc.
func vmRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	t.Fatalf("no VmRSS for pid %d", pid)
	return 0
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// A guest that prints 1 GiB cannot grow the server: the buffered exec answers with the
// first MiB and truncated, the streaming exec passes every byte, and the server's RSS
// stays within 64 MiB of where it started. A streaming exec carries stdin, a TTY and the
// exit status (also through `kiln machine exec`), and a client that goes away takes its
// command with it. Timeouts above exec.timeout_max are refused. An exec's request id
// is on the server's lines about it and on the guest agent's, and with --log-format json
// every line the server writes is a JSON record.
func TestExecBoundedMemory(t *testing.T) {
	e := newEnv(t)
	srv := startServer(t, e, freeAddr(t), "--proxy-listen", "off", "--network=false", "--log-format", "json")
	defer stopOnFailure(&srv)
	ctx := context.Background()
	token := readToken(t, filepath.Join(e.dataDir, "admin-token"))
	cl := client.New(srv.url, token)
	loadImage(t, srv, imagetest.App(t), "localhost/app:1")
	cl.CreateApp(ctx, "web")
	m, err := cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
		Init: api.Init{Cmd: []string{"sh", "-c", "while true; do sleep 1; done"}}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Wait(ctx, "web", m.ID, "started", 90*time.Second); err != nil {
		t.Fatalf("wait: %v\n%s", err, srv.logs)
	}
	execWithRequestID(t, srv, token, "web", m.ID, "test-123")
	stream := func(req api.ExecRequest, stdin io.Reader, stdout, stderr io.Writer) api.ExecExit {
		t.Helper()
		sess, err := cl.ExecStream(ctx, "web", m.ID, req)
		if err != nil {
			t.Fatalf("streaming exec %v: %v", req.Command, err)
		}
		st, err := sess.Run(ctx, stdin, stdout, stderr)
		if err != nil {
			t.Fatalf("streaming exec %v: %v", req.Command, err)
		}
		return st
	}

	// Stdin in (more than the buffered API's 1 MiB), output and the exit status out.
	in := bytes.Repeat([]byte("kiln\n"), 1<<20)
	var out, errb bytes.Buffer
	st := stream(api.ExecRequest{Command: []string{"sh", "-c", "busybox wc -c; echo to stderr >&2; exit 7"}}, bytes.NewReader(in), &out, &errb)
	if st.ExitCode != 7 || strings.TrimSpace(out.String()) != strconv.Itoa(len(in)) || errb.String() != "to stderr\n" {
		t.Errorf("stdin round trip: exit %+v, stdout %q, stderr %q", st, out.String(), errb.String())
	}
	// A terminal of the size asked for.
	out.Reset()
	st = stream(api.ExecRequest{Command: []string{"sh", "-c", "busybox tty; busybox stty size"}, TTY: true, Rows: 33, Cols: 101}, nil, &out, nil)
	if st.ExitCode != 0 || !strings.Contains(out.String(), "/dev/pts/") || !strings.Contains(out.String(), "33 101") {
		t.Errorf("tty: exit %+v, output %q", st, out.String())
	}
	// The CLI streams too, and exits with the command's status.
	cliIn := "line one\nline two\n"
	cliOut, cliErr, code := srv.kiln(cliIn, "machine", "exec", m.ID, "--", "sh", "-c", "busybox cat; exit 3")
	if code != 3 || cliOut != cliIn {
		t.Errorf("kiln machine exec: exit %d, stdout %q, stderr %q", code, cliOut, cliErr)
	}
	if _, cliErr, code := srv.kiln("", "machine", "exec", m.ID, "--", "kiln-no-such-command"); code != 127 || !strings.Contains(cliErr, "kiln-no-such-command") {
		t.Errorf("a missing command: exit %d, stderr %q", code, cliErr)
	}
	// A client that goes away takes its command with it.
	sess, err := cl.ExecStream(ctx, "web", m.ID, api.ExecRequest{Command: []string{"busybox", "sleep", "1007"}})
	if err != nil {
		t.Fatal(err)
	}
	sess.Close()
	waitFor(t, func() bool {
		res, err := cl.Exec(ctx, "web", m.ID, []string{"sh", "-c", "busybox ps | busybox grep -v grep | busybox grep -c 'sleep 1007'"}, "", 30*time.Second)
		return err == nil && strings.TrimSpace(res.Stdout) == "0"
	}, "a streaming exec's command to end with its client")
	// Timeouts are capped.
	if _, err := cl.Exec(ctx, "web", m.ID, []string{"true"}, "", 2*time.Hour); !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "exec.timeout_max") {
		t.Errorf("a 2 h timeout: %v", err)
	}
	limits, _, _ := srv.kiln("", "limits", "show")
	for _, l := range []string{"exec.output", "exec.timeout_max", "machine.console_log"} {
		if !strings.Contains(limits, l) {
			t.Errorf("limits show lacks %s:\n%s", l, limits)
		}
	}

	// 1 GiB, buffered then streamed, with the server's RSS sampled throughout.
	pid := srv.cmd.Process.Pid
	base := vmRSS(t, pid)
	var peak atomic.Int64
	peak.Store(base)
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if r := vmRSS(t, pid); r > peak.Load() {
				peak.Store(r)
			}
		}
	}()
	gib := []string{"busybox", "head", "-c", strconv.Itoa(1 << 30), "/dev/zero"}
	t0 := time.Now()
	res, err := cl.Exec(ctx, "web", m.ID, gib, "", 10*time.Minute)
	if err != nil || res.ExitCode != 0 || len(res.Stdout) != 1<<20 || !res.Truncated {
		t.Errorf("buffered 1 GiB: exit %d, %d bytes of stdout, truncated %v, %v", res.ExitCode, len(res.Stdout), res.Truncated, err)
	}
	t.Logf("buffered exec of 1 GiB: %s", time.Since(t0).Round(time.Second))
	t0 = time.Now()
	var n countWriter
	st = stream(api.ExecRequest{Command: gib}, nil, &n, nil)
	if st.ExitCode != 0 || n.n != 1<<30 {
		t.Errorf("streamed 1 GiB: exit %+v, %d bytes", st, n.n)
	}
	t.Logf("streaming exec of 1 GiB: %s", time.Since(t0).Round(time.Second))
	close(stop)
	<-sampled
	t.Logf("server RSS: %d MiB before, %d MiB at most during", base>>20, peak.Load()>>20)
	if grew := peak.Load() - base; grew > 64<<20 {
		t.Errorf("the server's RSS grew by %d MiB during 1 GiB of exec output, more than 64 MiB", grew>>20)
	}

	if _, errs, code := srv.kiln("", "machine", "destroy", "-f", m.ID); code != 0 {
		t.Fatal(errs)
	}
	srv.stop(syscall.SIGTERM)
	logs := srv.logs.String()
	srv = nil
	requireJSONLines(t, logs)
}
