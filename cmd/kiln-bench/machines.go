package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/registry"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// benchImage builds an image: the host's static busybox and payloadMiB of incompressible
// files, so conversion measures real bytes.
func benchImage(payloadMiB int) (v1.Image, int64, error) {
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return nil, 0, fmt.Errorf("static busybox (make setup installs busybox-static): %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, mode int64, body []byte) {
		tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Size: int64(len(body)), Typeflag: tar.TypeReg, ModTime: time.Unix(1700000000, 0)})
		tw.Write(body)
	}
	tw.WriteHeader(&tar.Header{Name: "bin/", Mode: 0o755, Typeflag: tar.TypeDir})
	add("bin/busybox", 0o755, bb)
	// A hard link carries its target's mode, as docker writes it: some extractors apply it.
	tw.WriteHeader(&tar.Header{Name: "bin/sh", Mode: 0o755, Typeflag: tar.TypeLink, Linkname: "bin/busybox"})
	tw.WriteHeader(&tar.Header{Name: "data/", Mode: 0o755, Typeflag: tar.TypeDir})
	total := int64(len(bb))
	chunk := make([]byte, 1<<20)
	for i := 0; i < payloadMiB; i++ {
		rand.Read(chunk)
		add(fmt.Sprintf("data/blob%03d", i), 0o644, chunk)
		total += int64(len(chunk))
	}
	tw.Close()
	b := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		return nil, 0, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, 0, err
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Config.Cmd = []string{"/bin/sh", "-c", "while true; do sleep 1; done"}
	img, err = mutate.ConfigFile(img, cf)
	return img, total, err
}

// benchMachines measures issue 3's figures: conversion, the second machine's image cost,
// create→started through the machine service, and listing 1000 machine records.
func benchMachines(ctx context.Context, rt *vmrun.Runtime, work string, add func(string, float64, string, string)) error {
	img, size, err := benchImage(128)
	if err != nil {
		return err
	}
	cache := image.Cache{Dir: filepath.Join(work, "rootfs")}
	start := time.Now()
	if _, err := cache.Rootfs(ctx, img, nil); err != nil {
		return err
	}
	el := time.Since(start)
	add("image_to_rootfs", float64(size)/el.Seconds()/1e6, "MB/s", fmt.Sprintf("%d MiB image, layers streamed into ext4 (tar2ext4), nothing unpacked on the host", size>>20))
	start = time.Now()
	if _, err := cache.Rootfs(ctx, img, nil); err != nil {
		return err
	}
	add("image_second_machine", float64(time.Since(start).Microseconds())/1000, "ms", "same digest: the ext4 is reused, nothing copied")

	db, err := sqlstore.Open(ctx, filepath.Join(work, "kiln.db"))
	if err != nil {
		return err
	}
	defer db.Close()
	regSrv := httptest.NewServer(registry.Handler(ctx, filepath.Join(work, "registry"), registry.Access{Auth: opAuth}))
	defer regSrv.Close()
	images := image.Registries{Local: strings.TrimPrefix(regSrv.URL, "http://"), Token: opToken}
	tar := filepath.Join(work, "bench.tar")
	if err := tarball.WriteToFile(tar, nil, img); err != nil {
		return err
	}
	if _, _, err := images.Load(ctx, tar, "localhost/bench:1"); err != nil {
		return err
	}
	mgr := machines.New(machines.Config{Store: db, VMs: rt, Images: images, Rootfs: cache, Dir: filepath.Join(work, "machines")})
	defer mgr.Close()
	db.CreateApp(ctx, "bench")
	var starts []time.Duration
	for i := 0; i < 5; i++ {
		t0 := time.Now()
		m, _, err := mgr.Create(ctx, "bench", api.CreateMachineRequest{Config: api.MachineConfig{Image: "localhost/bench:1"}})
		if err != nil {
			return err
		}
		if err := mgr.Wait(ctx, m.ID, machine.Started, 2*time.Minute); err != nil {
			return err
		}
		starts = append(starts, time.Since(t0))
		if err := mgr.Destroy(ctx, m.ID, true); err != nil {
			return err
		}
	}
	add("machine_create_to_started_p50", ms(pct(starts, 0.5)), "ms", fmt.Sprintf("5 machines, %s", rt.Accel))

	// Listing: 1000 records through the HTTP handler.
	db.CreateApp(ctx, "many")
	for i := 0; i < 1000; i++ {
		rec := store.Machine{ID: fmt.Sprintf("m%04d", i), App: "many", Name: fmt.Sprintf("m%04d", i), State: machine.Created,
			Config: []byte(`{"image":"localhost/bench:1","guest":{"cpus":1,"memory_mb":256}}`)}
		if err := db.CreateMachine(ctx, rec, machine.Event{Type: "launch", Source: "user"}); err != nil {
			return err
		}
	}
	srv := httptest.NewServer((&server.Server{Store: db, Node: mgr, Images: images, Auth: opAuth}).Handler())
	defer srv.Close()
	var lists []time.Duration
	for i := 0; i < 20; i++ {
		req, _ := http.NewRequest("GET", srv.URL+"/v1/apps/many/machines", nil)
		req.Header.Set("Authorization", "Bearer "+opToken)
		t0 := time.Now()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		lists = append(lists, time.Since(t0))
	}
	add("list_1000_machines_p50", ms(pct(lists, 0.5)), "ms", "GET /v1/apps/{app}/machines over HTTP, SQLite")
	return nil
}
