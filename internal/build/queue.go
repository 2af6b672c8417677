package build

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/cluster"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/store"
)

// Run starts builds from the queue until ctx ends. Builds that were running when kiln
// stopped are queued again first: that was the infrastructure failing, not the code.
func (s *Service) Run(ctx context.Context) {
	s.recover(ctx)
	s.kick()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		s.takeOver(ctx)
		s.schedule(ctx)
		if s.idling.CompareAndSwap(false, true) {
			// Suspending a builder takes seconds: the queue does not wait for it.
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer s.idling.Store(false)
				s.Builders.StopIdle(ctx)
			}()
		}
		s.mu.Lock()
		w := s.wake
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			s.mu.Lock()
			for _, stop := range s.running {
				stop()
			}
			s.mu.Unlock()
			s.wg.Wait() // every attempt has recorded how it ended
			return
		case <-w:
		case <-t.C:
		}
	}
}

func (s *Service) recover(ctx context.Context) {
	bs, err := s.Store.BuildsInState(ctx, Running)
	if err != nil {
		s.logf("reading running builds: %v", err)
		return
	}
	for _, b := range bs {
		if b.Host != s.Host {
			continue // another host's: it recovers its own, or takeOver does when it is down
		}
		s.logf("build %s was running when kiln stopped: queueing it again", b.ID)
		s.retryOrFail(ctx, b, retryKilnStopped, "kiln stopped while the build ran")
	}
}

// schedule starts the queued builds that may run now: oldest first, one per project,
// at most MaxConcurrent in all.
func (s *Service) schedule(ctx context.Context) {
	queued, err := s.Store.BuildsInState(ctx, Queued)
	if err != nil {
		if ctx.Err() == nil {
			s.logf("reading the queue: %v", err)
		}
		return
	}
	running, err := s.Store.BuildsInState(ctx, Running)
	if err != nil {
		return
	}
	busy := map[string]bool{}
	n := 0
	for _, b := range running {
		busy[b.Project] = true // one build per project, on whichever host
		if b.Host == s.Host {
			n++
		}
	}
	live := s.liveHosts(ctx)
	for _, b := range queued {
		if n >= s.MaxConcurrent || busy[b.Project] || time.Now().Before(b.NotBefore) {
			continue
		}
		note := ""
		if s.Host != "" {
			cacheHost := s.cacheHost(ctx, b.Project)
			switch {
			case cacheHost == "" || cacheHost == s.Host:
			case live[cacheHost]:
				continue // the host with the project's cache takes it: compute goes to the cache
			default:
				note = fmt.Sprintf("kiln: host %s, which holds the cache of %s, is down: building on %s with a fresh cache\n", cacheHost, b.Project, s.Host)
			}
		}
		bctx, stop := context.WithCancel(ctx)
		s.mu.Lock()
		if s.running == nil {
			s.running = map[string]context.CancelFunc{}
		}
		// Registered before the build shows as running, so that a cancel always finds it.
		s.running[b.ID] = stop
		delete(s.reasons, b.ID)
		s.mu.Unlock()
		started, err := s.transition(ctx, b, Running, nil)
		if err != nil {
			s.mu.Lock()
			delete(s.running, b.ID)
			s.mu.Unlock()
			stop()
			continue // canceled, or claimed by another host, meanwhile
		}
		// It waited from when it was queued (or its retry's backoff ended) until now.
		metrics.BuildQueueWait.WithLabelValues(b.Project).Observe(time.Since(latest(b.UpdatedAt, b.CreatedAt, b.NotBefore)).Seconds())
		if note != "" {
			s.writeLog(b.ID, note)
			s.logf("%s", strings.TrimSpace(note))
		}
		busy[b.Project] = true
		n++
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer stop()
			s.execute(bctx, started)
			s.mu.Lock()
			delete(s.running, started.ID)
			s.mu.Unlock()
			s.kick()
		}()
	}
}

// errInfra marks a failure of the infrastructure: the build is retried.
type errInfra struct{ err error }

func (e errInfra) Error() string { return e.err.Error() }
func (e errInfra) Unwrap() error { return e.err }

// execute runs one attempt of a build and records how it ended.
func (s *Service) execute(ctx context.Context, b store.Build) {
	start := time.Now()
	out, err := s.attempt(ctx, b)
	bg := context.WithoutCancel(ctx)
	s.mu.Lock()
	why := s.reasons[b.ID]
	delete(s.reasons, b.ID)
	s.mu.Unlock()
	finish := func(to string, edit func(*api.BuildResult)) {
		if _, err := s.transition(bg, b, to, func(r *api.BuildResult) {
			r.CachedSteps, r.TotalSteps, r.Steps = out.stats.Cached, out.stats.Total, out.stats.Steps
			r.BuilderReady, r.DurationMS, r.LogTruncated = out.ready.Milliseconds(), time.Since(start).Milliseconds(), out.truncated
			r.Builder, r.CacheReset, r.ImageSentBytes = out.builder, out.cacheReset, out.sent
			edit(r)
		}); err != nil {
			s.logf("recording the end of build %s: %v", b.ID, err)
		}
	}
	var infra errInfra
	outcome := func(o string) {
		metrics.BuildDuration.WithLabelValues(b.Project, o).Observe(time.Since(start).Seconds())
	}
	switch {
	case err == nil:
		outcome(Succeeded)
		if out.stats.Total > 0 {
			metrics.BuildCachedRatio.WithLabelValues(b.Project).Observe(float64(out.stats.Cached) / float64(out.stats.Total))
		}
		s.writeLog(b.ID, fmt.Sprintf("kiln: pushed %s (%s); %d of %d steps cached; the builder sent %d bytes of the image; %s\n", out.digest, joinTags(out.pushed), out.stats.Cached, out.stats.Total, out.sent, time.Since(start).Round(time.Millisecond)))
		finish(Succeeded, func(r *api.BuildResult) { r.Image, r.Pushed, r.Error, r.Failure = out.digest, out.pushed, "", "" })
		s.pruneImages(bg, b.Project)
		s.dropSecrets(b.ID)
	case why != "":
		outcome(Canceled)
		finish(Canceled, func(r *api.BuildResult) { r.Error = why })
		s.dropSecrets(b.ID)
	case ctx.Err() != nil:
		// kiln is shutting down: the build goes back to the queue for the next start.
		outcome("interrupted")
		s.retryOrFail(bg, b, retryKilnStopped, "kiln stopped while the build ran")
	case errors.As(err, &infra):
		outcome("infrastructure")
		s.writeLog(b.ID, fmt.Sprintf("kiln: infrastructure failure: %v\n", err))
		s.retryOrFail(bg, b, retryInfrastructure, err.Error())
	default:
		outcome(Failed)
		s.writeLog(b.ID, fmt.Sprintf("kiln: build failed: %v\n", err))
		finish(Failed, func(r *api.BuildResult) { r.Error, r.Failure = err.Error(), "code" })
		s.dropSecrets(b.ID)
	}
}

func (s *Service) dropSecrets(id string) {
	s.mu.Lock()
	delete(s.secrets, id)
	s.mu.Unlock()
}

// Why an attempt is retried, as kiln_build_infra_retries_total counts it: a few names,
// where why is free text.
const (
	retryKilnStopped    = "kiln-stopped"   // kiln stopped while the build ran
	retryHostLost       = "host-lost"      // the host running it stopped heartbeating
	retryInfrastructure = "infrastructure" // the builder VM or its BuildKit failed
)

// latest is the latest of some times.
func latest(ts ...time.Time) time.Time {
	var out time.Time
	for _, t := range ts {
		if t.After(out) {
			out = t
		}
	}
	return out
}

// retryOrFail queues a build again after an infrastructure failure, with backoff, or
// fails it when it has had MaxAttempts runs. reason names the kind of failure.
func (s *Service) retryOrFail(ctx context.Context, b store.Build, reason, why string) {
	metrics.BuildRetries.WithLabelValues(b.Project, reason).Inc()
	if b.Attempt >= s.MaxAttempts {
		s.transition(ctx, b, Failed, func(r *api.BuildResult) {
			r.Retries = append(r.Retries, why)
			r.Error = fmt.Sprintf("the infrastructure failed %d times; last: %s", b.Attempt, why)
			r.Failure = "infrastructure"
		})
		s.dropSecrets(b.ID)
		return
	}
	wait := s.Backoff << max(b.Attempt-1, 0)
	nb := b
	nb.NotBefore = time.Now().Add(wait)
	if _, err := s.transition(ctx, nb, Queued, func(r *api.BuildResult) { r.Retries = append(r.Retries, why) }); err != nil {
		s.logf("requeueing build %s: %v", b.ID, err)
		return
	}
	s.writeLog(b.ID, fmt.Sprintf("kiln: retrying in %s (attempt %d of %d failed: %s)\n", wait, b.Attempt, s.MaxAttempts, why))
}

func joinTags(t []string) string {
	out := ""
	for i, x := range t {
		if i > 0 {
			out += ", "
		}
		out += x
	}
	return out
}

type attemptResult struct {
	stats      stepStats
	ready      time.Duration
	builder    string
	cacheReset bool
	digest     string
	pushed     []string
	truncated  bool
	// sent is what the builder sent of the image: the blobs kiln lacked.
	sent int64
}

// attempt runs the build once on the project's builder.
func (s *Service) attempt(ctx context.Context, b store.Build) (out attemptResult, err error) {
	spec := toAPI(b).Spec
	dir := s.BuildDir(b.ID)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return out, errInfra{err}
	}
	if _, err := os.Stat(filepath.Join(dir, "context")); err != nil && s.Hosts != nil {
		// Submitted through another host: the context comes from the shared store.
		data, err := s.Store.BuildContext(ctx, b.ID)
		if err != nil {
			return out, errInfra{fmt.Errorf("fetching the build context: %w", err)}
		}
		if err := unpackStored(data, filepath.Join(dir, "context"), s.MaxContextBytes); err != nil {
			return out, errInfra{fmt.Errorf("unpacking the build context: %w", err)}
		}
	}
	logf, err := os.OpenFile(s.LogPath(b.ID), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600) // builds print secrets too
	if err != nil {
		return out, errInfra{err}
	}
	defer logf.Close()
	capped := &cappedWriter{w: logf, max: s.MaxLogBytes}
	// Named results: the deferred assignment reaches the caller.
	defer func() { out.truncated = capped.truncated }()
	fmt.Fprintf(capped, "kiln: build %s of %s, attempt %d\n", b.ID, b.Project, b.Attempt)

	// Base images from kiln's registry go into the shared OCI layout store; the build
	// sees only its own (solve).
	df, err := readDockerfile(filepath.Join(dir, "context"), spec.Dockerfile)
	if err != nil {
		return out, err
	}
	stages, err := parseStages(df, spec.BuildArgs)
	if err != nil {
		return out, err
	}
	refs, err := s.localBases(b.Project, stages)
	if err != nil {
		return out, err
	}
	bases := map[string]v1.Hash{}
	for _, ref := range refs {
		img, err := s.Images.Resolve(ctx, ref)
		if err != nil {
			return out, fmt.Errorf("base image %s: %w", ref, err)
		}
		dg, err := s.Bases.Add(img)
		if err != nil {
			return out, errInfra{fmt.Errorf("staging base image %s: %w", ref, err)}
		}
		bases[ref] = dg
	}
	s.mu.Lock()
	secrets := s.secrets[b.ID]
	s.mu.Unlock()
	if len(spec.SecretIDs) > 0 && secrets == nil {
		return out, errdefs.Invalid("the build's secrets were held in memory only and kiln restarted: submit the build again")
	}

	bd, err := s.Builders.Acquire(ctx, b.Project)
	if err != nil {
		return out, errInfra{err}
	}
	defer s.Builders.Release(bd)
	out.ready = bd.Ready
	switch {
	case bd.Resumed:
		out.builder = "resumed"
		fmt.Fprintf(capped, "kiln: resumed the suspended builder of %s in %s\n", b.Project, bd.Ready.Round(time.Millisecond))
	case bd.Ready > 0:
		out.builder = "cold"
		fmt.Fprintf(capped, "kiln: started the builder of %s in %s\n", b.Project, bd.Ready.Round(time.Millisecond))
		if bd.CacheReset {
			out.cacheReset = true
			fmt.Fprintf(capped, "kiln: the cache of %s was reset: its last builder did not stop cleanly (%d resets since kiln started)\n", b.Project, s.Builders.CacheResets(b.Project))
		}
	default:
		out.builder = "warm"
		fmt.Fprintf(capped, "kiln: the builder of %s is warm\n", b.Project)
	}
	c, err := bd.Client(ctx)
	if err != nil {
		s.Builders.Discard(ctx, bd)
		return out, errInfra{fmt.Errorf("connecting to buildkitd: %w", err)}
	}
	defer c.Close()
	images, sink, err := s.openImages(b.Project)
	if err != nil {
		return out, errInfra{fmt.Errorf("opening the image store of %s: %w", b.Project, err)}
	}
	labels := map[string]string{"kiln.project": b.Project, "kiln.build": b.ID}
	if spec.GitRef != "" {
		labels["kiln.git-ref"] = spec.GitRef
	}
	for k, v := range spec.Labels {
		labels[k] = v
	}
	var manifest string
	out.stats, manifest, err = solve(ctx, c, s.Bases, solveSpec{
		ContextDir: filepath.Join(dir, "context"), Dockerfile: spec.Dockerfile, Target: spec.Target,
		BuildArgs: spec.BuildArgs, Labels: labels, Secrets: secrets, Bases: bases, Images: sink, Log: capped,
	})
	out.sent = sink.sent.Load()
	if err != nil {
		if ctx.Err() != nil {
			return out, ctx.Err()
		}
		if !s.builderHealthy(ctx, bd) {
			s.Builders.Discard(ctx, bd)
			return out, errInfra{fmt.Errorf("the builder VM or its buildkitd went away mid-build: %v", err)}
		}
		if infrastructure(err) {
			return out, errInfra{err}
		}
		if cacheFull(ctx, bd) {
			// The retry finds the cache emptied.
			s.checkFull(ctx, bd, c, capped)
			return out, errInfra{fmt.Errorf("the cache volume of %s filled up: %w", b.Project, err)}
		}
		return out, err
	}
	s.checkFull(ctx, bd, c, capped)
	img, err := s.exportedImage(ctx, images, b.Project, manifest)
	if err != nil {
		return out, err
	}
	pushStart := time.Now()
	digest, pushed, err := s.Images.Push(ctx, img, spec.Tags...)
	if err != nil {
		return out, errInfra{fmt.Errorf("pushing the image to kiln's registry: %w", err)}
	}
	out.stats.Steps = append(out.stats.Steps, api.StepTiming{Name: PushStep, Millis: time.Since(pushStart).Milliseconds()})
	out.digest, out.pushed = digest, pushed
	if err := keepOnly(ctx, images, img); err != nil {
		s.logf("emptying the image store of %s of older images: %v", b.Project, err)
	}
	return out, nil
}

// PushStep names the push to the registry among a build's step timings.
const PushStep = "pushing to kiln's registry"

// builderHealthy tells a failed step (the code) from a failed builder (the
// infrastructure): after a failure the VM must still run and buildkitd still answer.
func (s *Service) builderHealthy(ctx context.Context, bd *Builder) bool {
	select {
	case <-bd.Inst.VM.Wait():
		return false
	case <-time.After(500 * time.Millisecond):
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := bd.Inst.Agent.Connect(cctx, buildkitdSock)
	if err != nil {
		return false
	}
	conn.Close()
	return true
}

// liveHosts lists the hosts whose heartbeat is recent; nil on a single host.
func (s *Service) liveHosts(ctx context.Context) map[string]bool {
	if s.Hosts == nil {
		return nil
	}
	hs, err := s.Hosts.ListHosts(ctx)
	if err != nil {
		return nil
	}
	live := map[string]bool{}
	now := time.Now()
	for _, h := range hs {
		if cluster.Live(h, now) { // down: its builds are taken over
			live[h.Name] = true
		}
	}
	return live
}

// cacheHost is the host that ran the project's last successful build: its builder's
// cache is there.
func (s *Service) cacheHost(ctx context.Context, project string) string {
	bs, err := s.Store.ListBuilds(ctx, project)
	if err != nil {
		return ""
	}
	for _, b := range bs {
		if b.State == Succeeded && b.Host != "" {
			return b.Host
		}
	}
	return ""
}

// takeOver queues again the builds of hosts that stopped heartbeating: their builder
// is gone with them (an infrastructure failure, retried here or elsewhere).
func (s *Service) takeOver(ctx context.Context) {
	if s.Hosts == nil {
		return
	}
	live := s.liveHosts(ctx)
	if live == nil {
		return
	}
	running, err := s.Store.BuildsInState(ctx, Running)
	if err != nil {
		return
	}
	for _, b := range running {
		if b.Host == "" || b.Host == s.Host || live[b.Host] {
			continue
		}
		s.logf("build %s ran on host %s, which stopped heartbeating: queueing it again", b.ID, b.Host)
		s.retryOrFail(ctx, b, retryHostLost, fmt.Sprintf("host %s stopped heartbeating mid-build", b.Host))
	}
}

// infrastructure says whether a solve error, with the builder still healthy, is kiln's
// side failing rather than the build: buildkitd's connection (gRPC's status code, not
// the message's text).
func infrastructure(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.ResourceExhausted:
		return true
	}
	return false
}

// cacheFull says whether the builder's cache volume is over ResetAbove after a failed
// step: a full disk is kiln's side (checkFull resets the cache), whatever the step
// printed. It is measured, not read from BuildKit's message, which carries ENOSPC only
// as text.
func cacheFull(ctx context.Context, bd *Builder) bool {
	total, used, err := usage(ctx, bd)
	return err == nil && total > 0 && float64(used)/float64(total) > ResetAbove
}
