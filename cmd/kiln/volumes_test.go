package main_test

import (
	"context"
	"fmt"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/image/imagetest"
)

// A fork through the API (source_volume_id, as Fly's client sends it) of a volume a
// running machine is writing holds what the machine wrote, without a sync of its own:
// the fork is flushed and copied as a snapshot is. The fork takes the source's size and
// mounts in another machine while the source stays attached.
func TestVolumeForkOfAVolumeInUse(t *testing.T) {
	e := newEnv(t)
	srv := startServer(t, e, freeAddr(t), "--proxy-listen", "off", "--network=false")
	defer stopOnFailure(&srv)
	ctx := context.Background()
	cl := client.New(srv.url, readToken(t, filepath.Join(e.dataDir, "admin-token")))
	loadImage(t, srv, imagetest.App(t), "localhost/app:1")
	cl.CreateApp(ctx, "web")
	size := 1
	src, err := cl.CreateVolume(ctx, "web", api.CreateVolumeRequest{Name: "pg_data", SizeGB: &size})
	if err != nil {
		t.Fatal(err)
	}
	writer, err := cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
		Init:   api.Init{Cmd: []string{"sh", "-c", "echo written-before-the-fork > /data/note; while true; do sleep 1; done"}},
		Mounts: []api.Mount{{Volume: "pg_data", Path: "/data"}}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Wait(ctx, "web", writer.ID, "started", 90*time.Second); err != nil {
		t.Fatalf("wait: %v\n%s", err, srv.logs)
	}
	var last string
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last exec: %s\nserver:\n%s", last, srv.logs)
		}
	})
	waitFor(t, func() bool {
		res, err := cl.Exec(ctx, "web", writer.ID, []string{"sh", "-c", "cat /data/note"}, "", 10*time.Second)
		last = fmt.Sprintf("%+v %v", res, err)
		return err == nil && res.Stdout == "written-before-the-fork\n"
	}, "the machine to write to its volume")

	fork, err := cl.CreateVolume(ctx, "web", api.CreateVolumeRequest{Name: "fork", SourceVolumeID: &src.ID})
	if err != nil {
		t.Fatalf("fork: %v", err)
	}
	if fork.ID == src.ID || fork.SizeGB != 1 || fork.AttachedMachineID != nil {
		t.Errorf("fork: %+v", fork)
	}
	if v, err := cl.ListVolumes(ctx, "web"); err != nil || len(v) != 2 || v[0].AttachedMachineID == nil || *v[0].AttachedMachineID != writer.ID {
		t.Errorf("volumes after the fork: %+v %v", v, err)
	}
	reader, err := cl.CreateMachine(ctx, "web", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/app:1",
		Init:   api.Init{Cmd: []string{"sh", "-c", "while true; do sleep 1; done"}},
		Mounts: []api.Mount{{Volume: "fork", Path: "/fork"}}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Wait(ctx, "web", reader.ID, "started", 90*time.Second); err != nil {
		t.Fatalf("wait: %v\n%s", err, srv.logs)
	}
	res, err := cl.Exec(ctx, "web", reader.ID, []string{"sh", "-c", "cat /fork/note"}, "", 30*time.Second)
	if err != nil || res.Stdout != "written-before-the-fork\n" {
		t.Errorf("the fork's data in another machine: %+v %v", res, err)
	}

	for _, id := range []string{writer.ID, reader.ID} {
		if err := cl.Destroy(ctx, "web", id, true); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"fork", "pg_data"} {
		waitFor(t, func() bool { return cl.DeleteVolume(ctx, "web", name) == nil }, "volume "+name+" to be let go and deleted")
	}
	if v, err := cl.ListVolumes(ctx, "web"); err != nil || len(v) != 0 {
		t.Errorf("volumes left: %+v %v", v, err)
	}
	srv.stop(syscall.SIGTERM)
	srv = nil
}
