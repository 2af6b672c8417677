package main_test

import (
	"context"
	"encoding/json"
	"net/http"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/image/imagetest"
)

// GET …/ps lists a started machine's processes in Fly's shape, read by the guest's agent
// from /proc (the image has no ps): the workload is there with its command, directory,
// memory and the port it listens on. A stopped machine answers 409.
func TestMachinePs(t *testing.T) {
	e := newEnv(t)
	srv := startServer(t, e, freeAddr(t), "--proxy-listen", "off", "--network=false")
	defer stopOnFailure(&srv)
	ctx := context.Background()
	token := readToken(t, filepath.Join(e.dataDir, "admin-token"))
	cl := client.New(srv.url, token)
	loadImage(t, srv, imagetest.App(t), "localhost/app:1")
	cl.CreateApp(ctx, "web")
	const workload = "busybox httpd -f -p 8080 -h /data"
	m, err := cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
		Init: api.Init{Cmd: []string{"sh", "-c", "exec " + workload}}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Wait(ctx, "web", m.ID, "started", 90*time.Second); err != nil {
		t.Fatalf("wait: %v\n%s", err, srv.logs)
	}
	ps := func() (int, []api.ProcessStat, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", srv.url+"/v1/apps/web/machines/"+m.ID+"/ps", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var raw json.RawMessage
		json.NewDecoder(resp.Body).Decode(&raw)
		var procs []api.ProcessStat
		json.Unmarshal(raw, &procs)
		return resp.StatusCode, procs, string(raw)
	}

	// The workload is started before httpd has bound its port: look until it has.
	var found api.ProcessStat
	waitFor(t, func() bool {
		code, procs, raw := ps()
		if code != http.StatusOK {
			t.Fatalf("ps: %d %s", code, raw)
		}
		for _, p := range procs {
			if p.Command == workload {
				found = p
				for _, s := range p.ListenSockets {
					if s.Proto == "tcp" && strings.HasSuffix(s.Address, ":8080") {
						return true
					}
				}
			}
		}
		return false
	}, "the workload listening on 8080 in ps")
	now := uint64(time.Now().Unix())
	if found.PID <= 1 || found.Directory != "/data" || found.RSS == 0 || found.Stime == 0 || found.Stime > now+60 {
		t.Errorf("workload: %+v; want its PID, /data, its memory, a start time by the guest's clock", found)
	}
	var sawInit bool
	_, procs, _ := ps()
	for _, p := range procs {
		if p.PID == 1 {
			sawInit = true
		}
		if strings.HasPrefix(p.Command, "[") && strings.Contains(p.Command, "kworker") {
			t.Errorf("kernel thread listed: %+v", p)
		}
	}
	if !sawInit {
		t.Errorf("PID 1 (kiln-init) not listed: %+v", procs)
	}

	if err := cl.Stop(ctx, "web", m.ID); err != nil {
		t.Fatal(err)
	}
	if err := cl.Wait(ctx, "web", m.ID, "stopped", 90*time.Second); err != nil {
		t.Fatal(err)
	}
	if code, _, raw := ps(); code != http.StatusConflict || !strings.Contains(raw, "not running") {
		t.Errorf("ps of a stopped machine: %d %s; want 409 saying it is not running", code, raw)
	}
	if err := cl.Destroy(ctx, "web", m.ID, true); err != nil {
		t.Fatal(err)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}
