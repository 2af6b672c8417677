package build

import (
	"context"
	"fmt"
	"io"
	"strings"

	bkclient "github.com/moby/buildkit/client"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/volume"
)

// ResetAbove is the share of its volume a cache may fill after BuildKit's GC; above
// it the cache is emptied, logged and counted.
const ResetAbove = 0.75

// usage reads the cache volume's size and use from inside the running builder.
func usage(ctx context.Context, bd *Builder) (total, used int64, err error) {
	var out strings.Builder
	st, err := bd.Inst.Agent.Exec(ctx, guest.ExecRequest{Argv: []string{"stat", "-f", "-c", "%b %f %S", cacheDir}}, guest.IO{Stdout: &out})
	if err != nil {
		return 0, 0, err
	}
	if st.Code != 0 {
		return 0, 0, fmt.Errorf("stat -f %s exited %d", cacheDir, st.Code)
	}
	var blocks, free, bsize int64
	if _, err := fmt.Sscan(out.String(), &blocks, &free, &bsize); err != nil {
		return 0, 0, fmt.Errorf("reading stat -f output %q: %w", out.String(), err)
	}
	return blocks * bsize, (blocks - free) * bsize, nil
}

// prune removes every cache record of the builder's BuildKit and returns the bytes freed.
func prune(ctx context.Context, c *bkclient.Client) (int64, error) {
	ch := make(chan bkclient.UsageInfo)
	var freed int64
	done := make(chan struct{})
	go func() {
		for u := range ch {
			freed += u.Size
		}
		close(done)
	}()
	err := c.Prune(ctx, ch, bkclient.PruneAll)
	close(ch)
	<-done
	return freed, err
}

// checkFull resets the cache when it is over ResetAbove of its volume after a build
// (BuildKit's GC keeps it under its keep size, so this means GC could not keep up).
func (s *Service) checkFull(ctx context.Context, bd *Builder, c *bkclient.Client, log io.Writer) {
	total, used, err := usage(ctx, bd)
	if err == nil {
		metrics.BuildCacheSize.WithLabelValues(bd.Project).Set(float64(total))
		metrics.BuildCacheUsed.WithLabelValues(bd.Project).Set(float64(used))
	}
	if err != nil || total == 0 || float64(used)/float64(total) <= ResetAbove {
		return
	}
	freed, err := prune(ctx, c)
	if err != nil {
		fmt.Fprintf(log, "kiln: the cache of %s is %d%% full after GC and could not be reset: %v\n", bd.Project, used*100/total, err)
		return
	}
	s.Builders.countReset(bd.Project)
	metrics.BuildCacheResets.WithLabelValues(bd.Project).Inc()
	fmt.Fprintf(log, "kiln: the cache of %s was %d%% full after GC: reset it, %d MiB freed (%d resets since kiln started)\n",
		bd.Project, used*100/total, freed>>20, s.Builders.CacheResets(bd.Project))
	s.logf("reset the cache of %s: %d%% full after GC", bd.Project, used*100/total)
}

// CacheInfo tells what a project's cache holds, from the running builder when there is
// one, else from the volume's superblock.
func (s *Service) CacheInfo(ctx context.Context, project string) (api.BuildCache, error) {
	if err := ValidProject(project); err != nil {
		return api.BuildCache{}, err
	}
	out := api.BuildCache{Project: project, Path: s.Builders.CachePath(project), Builder: "stopped",
		KeepBytes: s.Builders.KeepBytes, ResetAbove: ResetAbove, Resets: s.Builders.CacheResets(project)}
	for _, p := range s.Builders.Suspended() {
		if p == project {
			out.Builder = "suspended"
		}
	}
	if bd := s.Builders.Running()[project]; bd != nil {
		out.Builder = "running"
		if total, used, err := usage(ctx, bd); err == nil {
			out.SizeBytes, out.UsedBytes = total, used
			return out, nil
		}
	}
	info, err := volume.Inspect(out.Path)
	if err != nil {
		out.Builder = "none"
		return out, nil // no build yet: no cache
	}
	out.SizeBytes, out.UsedBytes = info.Total, info.Used
	return out, nil
}

// PruneCache empties a project's cache through its builder (booting it if needed).
func (s *Service) PruneCache(ctx context.Context, project string) (int64, error) {
	if err := ValidProject(project); err != nil {
		return 0, err
	}
	bd, err := s.Builders.Acquire(ctx, project)
	if err != nil {
		return 0, err
	}
	defer s.Builders.Release(bd)
	c, err := bd.Client(ctx)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	freed, err := prune(ctx, c)
	if err == nil {
		s.logf("pruned the cache of %s: %d MiB freed", project, freed>>20)
	}
	return freed, err
}

// RemoveBuilder removes the project's builder VM (a build using it now fails and is
// retried); the cache volume stays, and the next build boots the builder on it again.
func (s *Service) RemoveBuilder(ctx context.Context, project string) error {
	if err := ValidProject(project); err != nil {
		return err
	}
	return s.Builders.Remove(ctx, project)
}
