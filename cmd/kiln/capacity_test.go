package main_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/image/imagetest"
	"github.com/kilnhq/kiln/internal/vmm"
)

func hasMessage(evs []api.Event, typ, text string) bool {
	for _, e := range evs {
		if e.Type == typ && strings.Contains(e.Message, text) {
			return true
		}
	}
	return false
}

// A host offering 640 MiB: a machine that can never fit is refused at once naming the
// resource and the numbers; one that does not fit yet waits in the queue with its
// position and starts when room frees; `kiln limits show` lists what the server
// enforces with where it was set; cordon stops new work.
func TestCapacity(t *testing.T) {
	e := newEnv(t)
	addr := freeAddr(t)
	reserve := vmm.HostMemoryMiB() - 640
	// Limits come from one config file (flag names as keys); an unknown key is refused.
	bad := filepath.Join(e.dataDir, "bad.toml")
	os.WriteFile(bad, []byte("capacity-wiat = \"2m\"\n"), 0o644)
	if _, errs, code := e.run("", "server", "--config", bad); code == 0 || !strings.Contains(errs, `unknown setting "capacity-wiat"`) {
		t.Fatalf("a config file with an unknown key: exit %d: %s", code, errs)
	}
	conf := filepath.Join(e.dataDir, "server.toml")
	os.WriteFile(conf, []byte("capacity-wait = \"2m\"\nmemory-overcommit = 1\nreserve-memory = "+itoa(reserve)+"\n"), 0o644)
	srv := startServer(t, e, addr, "--proxy-listen", "off", "--network=false", "--config", conf)
	defer stopOnFailure(&srv)
	ctx := context.Background()
	cl := client.New(srv.url, readToken(t, filepath.Join(e.dataDir, "admin-token")))
	loadImage(t, srv, imagetest.App(t), "localhost/app:1")
	cl.CreateApp(ctx, "web")
	run := func(mem int) (api.Machine, error) {
		return cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
			Guest: api.Guest{CPUs: 1, MemoryMB: mem}, Init: api.Init{Cmd: []string{"sh", "-c", "while true; do sleep 1; done"}}}})
	}
	if _, err := run(1024); err == nil || !strings.Contains(err.Error(), "not enough memory on host") || !strings.Contains(err.Error(), "1024 MiB asked, 0 of 640 MiB in use") {
		t.Fatalf("a machine larger than the host offers: %v", err)
	}
	first, err := run(384)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Wait(ctx, "web", first.ID, "started", 90*time.Second); err != nil {
		t.Fatal(err)
	}
	// A caller that will not wait is refused at once, with the numbers.
	_, err = cl.CreateMachine(ctx, "web", api.CreateMachineRequest{NoCapacityWait: true, Config: api.MachineConfig{Image: "localhost/app:1",
		Guest: api.Guest{CPUs: 1, MemoryMB: 384}, Init: api.Init{Cmd: []string{"sh", "-c", "sleep 1000"}}}})
	if err == nil || !strings.Contains(err.Error(), "384 MiB asked, 384 of 640 MiB in use") {
		t.Fatalf("no_capacity_wait: %v", err)
	}
	if ms, _ := cl.ListMachines(ctx, "web"); len(ms) != 1 {
		t.Fatalf("a refused machine was recorded: %d machines", len(ms))
	}
	second, err := run(384)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		evs, _ := cl.Events(ctx, "web", second.ID)
		return hasMessage(evs, "capacity-queued", "position 1 in the capacity queue") && hasMessage(evs, "capacity-queued", "not enough memory on host")
	}, "the second machine to wait in the capacity queue")
	out, _, _ := srv.kiln("", "host", "ls")
	if !strings.Contains(out, "384/640") {
		t.Errorf("host ls does not show 384 of 640 MiB used:\n%s", out)
	}
	if _, errs, code := srv.kiln("", "machine", "stop", first.ID); code != 0 {
		t.Fatal(errs)
	}
	if err := cl.Wait(ctx, "web", second.ID, "started", 90*time.Second); err != nil {
		t.Fatalf("the queued machine did not start once room freed: %v", err)
	}

	// Every limit in the server's registry is shown, with a value, a source and what it
	// bounds.
	registry, err := cl.Limits(ctx)
	if err != nil || len(registry) < 20 {
		t.Fatalf("limits: %d %v", len(registry), err)
	}
	out, errs, code := srv.kiln("", "limits", "show")
	for _, l := range registry {
		if l.Value == "" || l.Source == "" || l.Description == "" {
			t.Errorf("limit %s lacks a value, source or description: %+v", l.Name, l)
		}
		if !strings.Contains(out, l.Name) {
			t.Errorf("limits show does not list %s", l.Name)
		}
	}
	for _, want := range []string{"host.memory_offered", "640 MiB", "config file (reserve-memory)", "capacity.queue_wait", "2m0s", "config file (capacity-wait)", "default (flag --wake-timeout)", "machine.memory", "network.apps",
		"http.header_timeout", "default (flag --header-timeout)", "api.unauthenticated_conns", "proxy.tcp_conns", "process.open_files"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("limits show lacks %q: %d %s %s", want, code, out, errs)
		}
	}

	hosts, _ := cl.Hosts(ctx)
	if _, errs, code := srv.kiln("", "host", "cordon", hosts[0].Name); code != 0 {
		t.Fatal(errs)
	}
	third, err := run(128)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		evs, _ := cl.Events(ctx, "web", third.ID)
		return hasMessage(evs, "capacity-queued", "is cordoned")
	}, "a machine to wait while the only host is cordoned")
	srv.kiln("", "host", "uncordon", hosts[0].Name)
	if err := cl.Wait(ctx, "web", third.ID, "started", 90*time.Second); err != nil {
		t.Fatalf("after uncordon: %v", err)
	}
	for _, id := range []string{first.ID, second.ID, third.ID} {
		srv.kiln("", "machine", "destroy", "-f", id)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}

func itoa(n int) string { return strconv.Itoa(n) }
