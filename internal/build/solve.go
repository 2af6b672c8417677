package build

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/plugins/content/local"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	bkclient "github.com/moby/buildkit/client"
	"github.com/moby/buildkit/exporter/containerimage/exptypes"
	"github.com/moby/buildkit/session"
	"github.com/moby/buildkit/session/secrets/secretsprovider"
	"github.com/moby/buildkit/util/progress/progressui"
	"github.com/tonistiigi/fsutil"

	"github.com/kilnhq/kiln/api"
)

// baseStoreID names the OCI layout store through which a build receives base images
// from kiln's registry: builder VMs have no route to it, so the images travel over the
// build's session like the context does.
const baseStoreID = "kiln-images"

// Bases holds base images in an OCI layout directory shared by all builds; each build
// sees only its own through View.
type Bases struct {
	Dir string
	mu  sync.Mutex
}

// Add puts img in the layout (blobs are shared by digest) and returns its digest.
func (b *Bases) Add(img v1.Image) (v1.Hash, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	dg, err := img.Digest()
	if err != nil {
		return dg, err
	}
	p, err := layout.FromPath(b.Dir)
	if err != nil {
		if p, err = layout.Write(b.Dir, empty.Index); err != nil {
			return dg, err
		}
	}
	if idx, err := p.ImageIndex(); err == nil {
		if m, err := idx.IndexManifest(); err == nil {
			for _, d := range m.Manifests {
				if d.Digest == dg {
					return dg, nil
				}
			}
		}
	}
	return dg, p.AppendImage(img)
}

func (b *Bases) store() (content.Store, error) {
	if err := os.MkdirAll(filepath.Join(b.Dir, "blobs"), 0o755); err != nil {
		return nil, err
	}
	return local.NewStore(b.Dir)
}

// solveSpec is one build as BuildKit gets it.
type solveSpec struct {
	ContextDir string
	Dockerfile string // relative to ContextDir
	Target     string
	BuildArgs  map[string]string
	Labels     map[string]string
	Secrets    map[string][]byte
	// Bases maps FROM references to digests in the base store.
	Bases map[string]v1.Hash
	// Images receives the image's blobs, those it lacks only (export.go).
	Images content.Store
	// Log receives BuildKit's plain progress.
	Log io.Writer
}

// stepStats counts the steps BuildKit ran and those it took from its cache.
type stepStats struct {
	Total, Cached int
	Steps         []api.StepTiming
}

// solve runs the build and returns its steps and the digest of the image's manifest,
// which BuildKit wrote with the image's other blobs into s.Images.
func solve(ctx context.Context, c *bkclient.Client, bases *Bases, s solveSpec) (stepStats, string, error) {
	var stats stepStats
	ctxFS, err := fsutil.NewFS(s.ContextDir)
	if err != nil {
		return stats, "", err
	}
	dfDir := filepath.Dir(filepath.Join(s.ContextDir, s.Dockerfile))
	dfFS, err := fsutil.NewFS(dfDir)
	if err != nil {
		return stats, "", err
	}
	attrs := map[string]string{"filename": filepath.Base(s.Dockerfile)}
	if s.Target != "" {
		attrs["target"] = s.Target
	}
	for k, v := range s.BuildArgs {
		attrs["build-arg:"+k] = v
	}
	for k, v := range s.Labels {
		attrs["label:"+k] = v
	}
	opt := bkclient.SolveOpt{
		Frontend:      "dockerfile.v0",
		FrontendAttrs: attrs,
		LocalMounts:   map[string]fsutil.FS{"context": ctxFS, "dockerfile": dfFS},
		// Into a store rather than as a tarball: BuildKit then sends only the blobs the
		// store lacks.
		Exports: []bkclient.ExportEntry{{
			Type:        bkclient.ExporterOCI,
			Attrs:       map[string]string{"tar": "false"},
			OutputStore: s.Images,
		}},
		Session: []session.Attachable{secretsprovider.FromMap(s.Secrets)},
	}
	if len(s.Bases) > 0 {
		digests := make([]v1.Hash, 0, len(s.Bases))
		for ref, dg := range s.Bases {
			attrs["context:"+ref] = fmt.Sprintf("oci-layout://%s@%s", baseStoreID, dg)
			digests = append(digests, dg)
		}
		// The session shows this build's bases only, read-only: BuildKit runs in the
		// builder VM, which is the project's, not the host's.
		st, err := bases.View(digests)
		if err != nil {
			return stats, "", err
		}
		opt.OCIStores = map[string]content.Store{baseStoreID: st}
	}
	ch := make(chan *bkclient.SolveStatus)
	tee := make(chan *bkclient.SolveStatus)
	display, err := progressui.NewDisplay(s.Log, progressui.PlainMode)
	if err != nil {
		return stats, "", err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		display.UpdateFrom(context.WithoutCancel(ctx), tee)
	}()
	seen := map[string]*api.StepTiming{}
	var order []string
	go func() {
		defer close(tee)
		for st := range ch {
			for _, v := range st.Vertexes {
				if v.Completed == nil {
					continue
				}
				t := seen[v.Digest.String()]
				if t == nil {
					t = &api.StepTiming{}
					seen[v.Digest.String()] = t
					order = append(order, v.Digest.String())
				}
				t.Name, t.Cached = v.Name, v.Cached
				if v.Started != nil {
					t.Millis = v.Completed.Sub(*v.Started).Milliseconds()
				}
			}
			tee <- st
		}
	}()
	res, err := c.Solve(ctx, nil, opt, ch)
	<-done
	for _, d := range order {
		t := seen[d]
		if isStep(t.Name) {
			stats.Total++
			if t.Cached {
				stats.Cached++
			}
		}
		stats.Steps = append(stats.Steps, *t)
	}
	if err != nil {
		return stats, "", err
	}
	return stats, res.ExporterResponse[exptypes.ExporterImageDigestKey], nil
}

// isStep says whether a vertex is a Dockerfile instruction ("[stage 2/4] RUN ...") rather
// than BuildKit's own bookkeeping (loading the context, metadata, exporting).
func isStep(name string) bool {
	return strings.HasPrefix(name, "[") && !strings.HasPrefix(name, "[internal]") && !strings.Contains(name, "] FROM ") && !strings.HasPrefix(name, "[context ")
}
