package main

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kilnhq/kiln/internal/auth/authtest"

	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/assets"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/image"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/registry"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// benchDockerfile is a small project: a dependency step that is slow when it runs, the
// source copied after it, a compile step on the source, and a final stage.
const benchDockerfile = `FROM localhost/bench-base:1 AS build
RUN busybox mkdir /deps && for i in 1 2 3 4 5 6 7 8; do busybox head -c 1048576 /dev/urandom > /deps/dep$i; done
COPY src /src
RUN busybox cat /src/* | busybox wc -c > /src/size && busybox cp -r /src /app

FROM localhost/bench-base:1
COPY --from=build /deps /deps
COPY --from=build /app /app
`

// benchBuilds times a cold build (new builder, empty cache), a warm rebuild with no
// change and one with one file changed, and a builder's readiness cold and warm.
func benchBuilds(ctx context.Context, rt *vmrun.Runtime, dataDir, work string, add func(string, float64, string, string)) error {
	bk := os.Getenv("KILN_BUILDKITD")
	if bk == "" {
		bk = "bin/buildkitd"
	}
	rootfs, err := assets.EnsureBuilder(ctx, assets.Options{Dir: filepath.Join(dataDir, "assets"), Log: os.Stderr, BuildRootfs: true}, bk)
	if err != nil {
		return err
	}
	db, err := sqlstore.Open(ctx, filepath.Join(work, "builds.db"))
	if err != nil {
		return err
	}
	defer db.Close()
	regSrv := httptest.NewServer(registry.Handler(ctx, filepath.Join(work, "build-registry"), registry.Access{Auth: opAuth}))
	defer regSrv.Close()
	images := image.Registries{Local: strings.TrimPrefix(regSrv.URL, "http://"), Token: opToken}
	base, _, err := benchImage(0)
	if err != nil {
		return err
	}
	baseTar := filepath.Join(work, "base.tar")
	if err := tarball.WriteToFile(baseTar, nil, base); err != nil {
		return err
	}
	if _, _, err := images.Load(ctx, baseTar, "localhost/bench-base:1"); err != nil {
		return err
	}
	bs := &build.Builders{RT: rt, Rootfs: rootfs, Dir: filepath.Join(work, "builders"), CacheBytes: 4 << 30, KeepBytes: 2 << 30,
		CPUs: 2, MemoryMiB: 1024, Idle: time.Hour}
	// Builders are machines of kiln's own, supervised by the machines service as the
	// server's are (internal/daemon wires them the same way).
	msvc := machines.New(machines.Config{Store: db, VMs: rt, Images: images, Rootfs: image.Cache{Dir: filepath.Join(work, "rootfs")},
		Dir: filepath.Join(work, "machines"), Internal: map[string]machines.Internal{build.BuildersApp: bs}})
	defer msvc.Close()
	bs.Use(msvc)
	// Before the service closes (defers run last first): the builder VM must not outlive
	// the bench, nor load the host while the placement benchmark runs.
	defer bs.Close(context.WithoutCancel(ctx))
	svc := &build.Service{Store: db, Builders: bs, Bases: &build.Bases{Dir: filepath.Join(work, "bases")}, Images: images,
		Dir: filepath.Join(work, "builds"), MaxContextBytes: 64 << 20, MaxLogBytes: 1 << 20, MaxAttempts: 1,
		Backoff: time.Second, MaxConcurrent: 1}
	sctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { svc.Run(sctx); close(done) }()
	defer func() { stop(); <-done }()

	files := map[string]string{"Dockerfile": benchDockerfile}
	for i := 0; i < 20; i++ {
		files[fmt.Sprintf("src/file%02d.txt", i)] = strings.Repeat(fmt.Sprintf("line %d\n", i), 200)
	}
	run := func(what string) (api.Build, time.Duration, error) {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for name, body := range files {
			tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg, ModTime: time.Unix(1700000000, 0)})
			tw.Write([]byte(body))
		}
		tw.Close()
		start := time.Now()
		b, err := svc.Submit(ctx, "bench", api.BuildSpec{Tags: []string{"localhost/bench/app:1"}}, &buf, nil)
		if err != nil {
			return b, 0, err
		}
		for !build.Terminal(b.State) {
			time.Sleep(20 * time.Millisecond)
			if b, err = svc.Get(ctx, b.ID); err != nil {
				return b, 0, err
			}
		}
		el := time.Since(start)
		if b.State != build.Succeeded {
			log, _ := os.ReadFile(svc.LogPath(b.ID))
			return b, el, fmt.Errorf("%s build %s: %s\n%s", what, b.State, b.Error, log)
		}
		fmt.Fprintf(os.Stderr, "%s build: %s, %d/%d steps cached\n", what, el.Round(time.Millisecond), b.CachedSteps, b.TotalSteps)
		return b, el, nil
	}
	cold, coldT, err := run("cold")
	if err != nil {
		return err
	}
	same, sameT, err := run("no-change")
	if err != nil {
		return err
	}
	files["src/file07.txt"] += "one more line\n"
	change, changeT, err := run("one-file-change")
	if err != nil {
		return err
	}
	readyCold := time.Duration(cold.BuilderReady) * time.Millisecond
	add("build_cold", ms(coldT), "ms", fmt.Sprintf("new builder VM and empty cache; builder ready in %d ms", cold.BuilderReady))
	add("build_warm_no_change", ms(sameT), "ms", fmt.Sprintf("%.2fx of cold; %d/%d steps cached; builder already up", float64(sameT)/float64(coldT), same.CachedSteps, same.TotalSteps))
	add("build_warm_one_file_changed", ms(changeT), "ms", fmt.Sprintf("%.2fx of cold; %d/%d steps cached", float64(changeT)/float64(coldT), change.CachedSteps, change.TotalSteps))
	add("builder_ready_cold", ms(readyCold), "ms", "boot the builder VM, start buildkitd, first answer")
	add("builder_ready_warm", float64(same.BuilderReady), "ms", "the project's builder is running: no wait")
	var solveMS, exportMS, pushMS int64
	for _, st := range same.Steps {
		switch {
		case strings.HasPrefix(st.Name, "exporting"):
			exportMS += st.Millis
		case st.Name == build.PushStep:
			pushMS += st.Millis
		default:
			solveMS += st.Millis
		}
	}
	add("build_warm_no_change_export", float64(exportMS), "ms", fmt.Sprintf("of the no-change rebuild: exporting the image, %d bytes sent by the builder (other steps %d ms, summed)", same.ImageSentBytes, solveMS))
	add("build_warm_no_change_push", float64(pushMS), "ms", "of the no-change rebuild: pushing to kiln's registry, which has every layer")
	return nil
}

// opAuth checks tokens; opToken is the operator's.
var opAuth, opToken = authtest.Operator()
