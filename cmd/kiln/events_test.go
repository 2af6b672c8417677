package main_test

import (
	"bufio"
	"bytes"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// follower is a running `kiln events -f`: its lines as they come.
type follower struct {
	lines  chan string
	mu     sync.Mutex
	stderr bytes.Buffer
}

func (f *follower) errs() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stderr.String()
}

// expect waits for a line holding every one of want, and returns the lines before it.
func (f *follower) expect(t *testing.T, want ...string) []string {
	t.Helper()
	var before []string
	timeout := time.After(2 * time.Minute)
	for {
		select {
		case l, ok := <-f.lines:
			if !ok {
				t.Fatalf("kiln events -f ended before a line with %q; it said:\n%s", want, f.errs())
			}
			match := true
			for _, w := range want {
				match = match && strings.Contains(l, w)
			}
			if match {
				return before
			}
			before = append(before, l)
		case <-timeout:
			t.Fatalf("no line with %q from kiln events -f within 2 minutes; lines %q; it said:\n%s", want, before, f.errs())
		}
	}
}

// An operator follows one app's events with `kiln events -f` while a real machine is
// created and started: launch and start arrive as they happen, in the CLI's one line per
// event. The follow outlives a restart of the server, resuming without a gap or a
// repeat; a scoped token cannot follow another app.
func TestEventsEndToEnd(t *testing.T) {
	e := newEnv(t)
	addr := freeAddr(t)
	flags := []string{"--proxy-listen", "off", "--network=false"}
	srv := startServer(t, e, addr, flags...)
	defer stopOnFailure(&srv)
	loadBase(t, srv)

	c := e.cmd("--api-url", srv.url, "events", "-f", "--app", "web")
	out, _ := c.StdoutPipe()
	f := &follower{lines: make(chan string, 100)}
	c.Stderr = writerFunc(func(p []byte) (int, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.stderr.Write(p)
	})
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	go func() {
		defer close(f.lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f.lines <- sc.Text()
		}
	}()

	// Another app's machine is no event of web's.
	otherOut, errs, code := srv.kiln("", "machine", "run", "localhost/busybox:1", "--app", "other", "--detach", "--", "sleep", "600")
	if code != 0 {
		t.Fatalf("machine run in app other: %s", errs)
	}
	other := lastLine(otherOut)
	runOut, errs, code := srv.kiln("", "machine", "run", "localhost/busybox:1", "--app", "web", "--", "sleep", "600")
	if code != 0 {
		t.Fatalf("machine run: %s\n%s", errs, srv.logs)
	}
	m := lastLine(runOut)
	var seen []string
	for _, want := range [][]string{
		{"machine.launch", "web/" + m, "created"},
		{"machine.start", "web/" + m, "starting"},
		{"machine.start", "web/" + m, "started"},
	} {
		seen = append(seen, f.expect(t, want...)...)
	}
	for _, l := range seen {
		if strings.Contains(l, "other/") {
			t.Errorf("web's follow printed another app's event: %q", l)
		}
	}

	// The server restarts; the follow reconnects and goes on after the last event it
	// printed.
	srv.stop(syscall.SIGTERM)
	srv = startServer(t, e, addr, flags...)
	if _, errs, code := srv.kiln("", "machine", "stop", m); code != 0 {
		t.Fatalf("machine stop: %s", errs)
	}
	for _, l := range f.expect(t, "machine.stop", "web/"+m, "stopped") {
		if strings.Contains(l, "machine.launch") || strings.Contains(l, "started") && strings.Contains(l, "machine.start") {
			t.Errorf("after reconnecting, an event printed before: %q", l)
		}
	}
	if !strings.Contains(f.errs(), "reconnecting") {
		t.Errorf("kiln events -f did not say it reconnected:\n%s", f.errs())
	}

	out2, errs, code := srv.kiln("", "tokens", "create", "--app", "web", "--role", "read", "--expiry", "1h")
	if code != 0 {
		t.Fatalf("tokens create: %s", errs)
	}
	tok := strings.TrimSpace(out2)
	if _, errs, code := srv.kiln("", "--token", tok, "events", "--app", "other"); code == 0 || !strings.Contains(errs, "app other not found") {
		t.Errorf("events of another app with web's token: %d %s", code, errs)
	}
	if list, errs, code := srv.kiln("", "--token", tok, "events"); code != 0 || !strings.Contains(list, "web/"+m) || strings.Contains(list, "other/") {
		t.Errorf("events with web's token: %d\n%s%s", code, list, errs)
	}

	for _, id := range []string{m, other} {
		if _, errs, code := srv.kiln("", "machine", "destroy", "-f", id); code != 0 {
			t.Errorf("destroy %s: %s", id, errs)
		}
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}

// lastLine is the last line of a command's output: what `kiln machine run` prints last
// is the machine's ID.
func lastLine(out string) string {
	out = strings.TrimSpace(out)
	return out[strings.LastIndex(out, "\n")+1:]
}

type writerFunc func([]byte) (int, error)

func (w writerFunc) Write(p []byte) (int, error) { return w(p) }
