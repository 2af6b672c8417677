package main_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	// chromedp is the standard Go driver for the Chrome DevTools protocol: the test
	// drives Debian's Chromium from Go, over a pipe, with no Node, no WebDriver server
	// and nothing to download. Pinned in go.mod (v0.23.0).
	"github.com/chromedp/chromedp"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
)

// chromiumPath is Debian's Chromium, which `make setup` installs.
const chromiumPath = "/usr/bin/chromium"

// browser is one headless Chromium tab on the console.
type browser struct {
	t   *testing.T
	ctx context.Context

	mu      sync.Mutex
	console []string // what the page wrote to its console, for a failure's report
}

func newBrowser(t *testing.T) *browser {
	t.Helper()
	if _, err := os.Stat(chromiumPath); err != nil {
		t.Skipf("no Chromium at %s: run `make setup`", chromiumPath)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		// Chromium's sandbox refuses to run as root, which the tests are (they make VMs
		// and network namespaces); the page is kiln's own and talks only to the test's
		// server inside the tests' network namespace.
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.WindowSize(1280, 1000),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	b := &browser{t: t, ctx: ctx}
	messages := chromedp.Console(ctx)
	go func() {
		for m, err := range messages {
			if err != nil {
				return
			}
			b.mu.Lock()
			if len(b.console) < 200 {
				b.console = append(b.console, fmt.Sprintf("%s:%d %s", m.URL, m.Line+1, m))
			}
			b.mu.Unlock()
		}
	}()
	if err := chromedp.Do(ctx); err != nil { // starts the browser, bound to ctx alone
		t.Fatalf("starting %s: %v", chromiumPath, err)
	}
	return b
}

// do runs actions, failing the test on an error.
func (b *browser) do(what string, actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, time.Minute)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		b.t.Fatalf("%s: %v", what, err)
	}
}

// text is the text of the first element sel matches, and whether there is one.
func (b *browser) text(sel string) (string, bool) {
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[*string](fmt.Sprintf(`(() => { const el = document.querySelector(%q); return el ? el.textContent : null })()`, sel)))
	if err != nil || v == nil {
		return "", false
	}
	return *v, true
}

// waitText waits until the element sel matches holds want in its text. The page
// changes it by itself (from the event stream or its poll); the test only watches,
// on each change of the DOM.
func (b *browser) waitText(sel, want string, within time.Duration) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, within+10*time.Second)
	defer cancel()
	_, err := chromedp.Run(ctx, chromedp.PollFunction[chromedp.Void](
		`(sel, want) => { const el = document.querySelector(sel); return !!el && el.textContent.includes(want) }`,
		chromedp.WithPollingMutation(), chromedp.WithPollingTimeout(within), chromedp.WithPollingArgs(sel, want)))
	if err != nil {
		got, ok := b.text(sel)
		if !ok {
			got = "(no such element)"
		}
		b.t.Fatalf("waiting %s for %s to show %q: %v; it shows %q", within, sel, want, err, got)
	}
}

// click clicks the element sel matches with the mouse, as a user would.
func (b *browser) click(sel string) {
	b.t.Helper()
	b.do("clicking "+sel, chromedp.Click(chromedp.CSS(sel), chromedp.NodeVisible))
}

// open follows an in-page link (a hash route): the page is not loaded again.
func (b *browser) open(hash string) {
	b.t.Helper()
	b.do("opening "+hash, chromedp.Evaluate[chromedp.Void](fmt.Sprintf(`location.hash = %q`, hash)))
}

func (b *browser) signIn(token string) {
	b.t.Helper()
	b.do("signing in", chromedp.WaitVisible(chromedp.CSS("#token")), chromedp.SendKeys(chromedp.CSS("#token"), token), chromedp.Click(chromedp.CSS("#signin-submit")))
	b.waitText("#whoami", " · ", 30*time.Second)
}

func (b *browser) signOut() {
	b.t.Helper()
	b.click("#signout")
	b.do("the sign-in form", chromedp.WaitVisible(chromedp.CSS("#token")))
}

// report, on a failure, saves a screenshot where it outlives the test, and logs what
// the page showed and wrote to its console.
func (b *browser) report() {
	if !b.t.Failed() {
		return
	}
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	if png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100)); err == nil {
		if f, err := os.CreateTemp("", "kiln-ui-failure-*.png"); err == nil {
			f.Write(png)
			f.Close()
			b.t.Logf("screenshot of the page: %s", f.Name())
		}
	}
	if text, err := chromedp.Run(ctx, chromedp.Evaluate[string](`location.href + "\n" + document.body.innerText`)); err == nil {
		b.t.Logf("the page showed:\n%s", text)
	}
	b.mu.Lock()
	b.t.Logf("the page's console:\n%s", strings.Join(b.console, "\n"))
	b.mu.Unlock()
}

// The web console in a real browser: an operator signs in, watches a machine start
// live, sees the server's refusal of an action, stops the machine, and follows a
// build's log; a read-only token is offered no action.
func TestWebConsole(t *testing.T) {
	e := newEnv(t)
	srv := startServer(t, e, freeAddr(t), "--proxy-listen", "off", "--network=false", "--build-cache-size", "4G", "--builder-memory", "1024")
	defer stopOnFailure(&srv)
	dir := loadBase(t, srv)
	ctx := context.Background()
	operator := readToken(t, filepath.Join(e.dataDir, "admin-token"))
	cl := client.New(srv.url, operator)

	b := newBrowser(t)
	defer b.report()
	b.do("opening the console", chromedp.Navigate(srv.url+"/ui/"))
	b.signIn(operator)
	if who, _ := b.text("#whoami"); !strings.Contains(who, "operator") {
		t.Errorf("signed in as %q, want the operator", who)
	}
	if !b.visible("#nav-hosts") {
		t.Error("the operator is not offered the hosts page")
	}

	// The app's page is open before the machine exists: it appears and reaches started
	// with no reload, from the event stream (or the poll where there is none).
	if err := cl.CreateApp(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	b.open("#/apps/web")
	b.waitText("#machines", "No machines.", 30*time.Second)
	m, err := cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/busybox:1",
		Init: api.Init{Cmd: []string{"sh", "-c", "echo hello-from-the-console-test; while true; do sleep 1; done"}}}})
	if err != nil {
		t.Fatal(err)
	}
	row := fmt.Sprintf(`#machines tr[data-machine=%q]`, m.ID)
	b.waitText(row+" .state", "started", 3*time.Minute)
	// The server has the event stream: the page follows it (it polls only where a server
	// has none), so a stream it could not read would show here.
	if live, _ := chromedp.Run(b.ctx, chromedp.Evaluate[string](`document.querySelector("#live").dataset.mode || ""`)); live != "stream" {
		t.Errorf("the page follows changes by %q, want the event stream", live)
	}

	// The machine's page: its live log, then a refused action and its message.
	b.click(row + " a")
	b.waitText("#machine-state", "started", 30*time.Second)
	b.waitText("#machine-logs", "hello-from-the-console-test", time.Minute)
	b.click(`#machine-actions button[data-action="destroy"]`)
	b.click(`#machine-actions button[data-action="confirm-destroy"]`)
	// Destroying a started machine needs force: the server refuses and says why.
	b.waitText("#error", "stop it first", 30*time.Second)
	if got, _ := cl.GetMachine(ctx, "web", m.ID); got.State != "started" {
		t.Errorf("after the refused destroy the machine is %s", got.State)
	}

	b.click(`#machine-actions button[data-action="stop"]`)
	b.waitText("#machine-state", "stopped", 2*time.Minute)

	// A build's log, followed while it runs: the line is what the step printed.
	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte("FROM localhost/busybox:1\nRUN echo console-build-$((6*7))\n"), 0o644)
	b.open("#/projects/site")
	b.waitText("#builds", "No builds.", 30*time.Second)
	out, errs, code := srv.kiln("", "build", dir, "--project", "site", "--detach")
	if code != 0 {
		t.Fatalf("kiln build --detach: %s", errs)
	}
	buildID := strings.TrimSpace(out)
	buildRow := fmt.Sprintf(`#builds tr[data-build=%q]`, buildID)
	b.waitText(buildRow, buildID, 30*time.Second)
	b.click(buildRow + " a")
	b.waitText("#build-log", "console-build-42", 5*time.Minute)
	b.waitText("#build-state", "succeeded", 2*time.Minute)
	b.waitText("#build-steps", "RUN echo console-build-$((6*7))", 30*time.Second)

	// A read-only token sees the machine and is offered nothing to do to it, nor hosts.
	out, errs, code = srv.kiln("", "tokens", "create", "--role", "read", "--app", "web")
	if code != 0 {
		t.Fatalf("tokens create: %s", errs)
	}
	b.signOut()
	b.signIn(strings.TrimSpace(out))
	b.open("#/apps/web")
	b.waitText(row+" .state", "stopped", 30*time.Second)
	if n, _ := chromedp.Run(b.ctx, chromedp.Evaluate[int](`document.querySelectorAll("#machines button").length`)); n != 0 {
		t.Errorf("a read-only token is offered %d buttons on the app's page", n)
	}
	if b.visible("#nav-hosts") {
		t.Error("a read-only token is offered the hosts page")
	}

	if err := cl.Destroy(ctx, "web", m.ID, false); err != nil {
		t.Error(err)
	}
	if _, errs, code := srv.kiln("", "build", "builder", "rm", "--project", "site"); code != 0 {
		t.Errorf("build builder rm: %s", errs)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}

// visible says whether the element sel matches is shown.
func (b *browser) visible(sel string) bool {
	v, err := chromedp.Run(b.ctx, chromedp.Evaluate[bool](fmt.Sprintf(`(() => { const el = document.querySelector(%q); return !!el && !el.hidden && el.getClientRects().length > 0 })()`, sel)))
	return err == nil && v
}
