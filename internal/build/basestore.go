package build

import (
	"context"
	"fmt"
	"strings"

	"github.com/containerd/containerd/v2/core/content"
	cerrdefs "github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// View returns the content store one build's session exposes: the blobs (manifest,
// config, layers) of images, each staged with Add, and nothing else, read-only. The
// layout holds every project's bases; BuildKit runs in the builder VM, so whatever it
// may ask of the session, it can neither see other builds' images nor change any.
func (b *Bases) View(images []v1.Hash) (content.Store, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	p, err := layout.FromPath(b.Dir)
	if err != nil {
		return nil, fmt.Errorf("opening the base image store: %w", err)
	}
	allowed := map[digest.Digest]bool{}
	for _, h := range images {
		img, err := p.Image(h)
		if err != nil {
			return nil, fmt.Errorf("base image %s is not staged: %w", h, err)
		}
		m, err := img.Manifest()
		if err != nil {
			return nil, fmt.Errorf("base image %s: %w", h, err)
		}
		allowed[digest.Digest(h.String())] = true
		allowed[digest.Digest(m.Config.Digest.String())] = true
		for _, l := range m.Layers {
			allowed[digest.Digest(l.Digest.String())] = true
		}
	}
	st, err := b.store()
	if err != nil {
		return nil, err
	}
	return &readOnlyStore{inner: st, allowed: allowed}, nil
}

// readOnlyStore shows the blobs in allowed of inner and refuses every change.
type readOnlyStore struct {
	inner   content.Store
	allowed map[digest.Digest]bool
}

var _ content.Store = (*readOnlyStore)(nil)

// errReadOnly is containerd's kind, which the session's gRPC server maps to
// PermissionDenied for BuildKit.
var errReadOnly = fmt.Errorf("a build's base image store is read-only: %w", cerrdefs.ErrPermissionDenied)

func (s *readOnlyStore) visible(d digest.Digest) error {
	if !s.allowed[d] {
		return fmt.Errorf("content %s: %w", d, cerrdefs.ErrNotFound)
	}
	return nil
}

func (s *readOnlyStore) Info(ctx context.Context, d digest.Digest) (content.Info, error) {
	if err := s.visible(d); err != nil {
		return content.Info{}, err
	}
	return s.inner.Info(ctx, d)
}

func (s *readOnlyStore) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	if err := s.visible(desc.Digest); err != nil {
		return nil, err
	}
	return s.inner.ReaderAt(ctx, desc)
}

func (s *readOnlyStore) Walk(ctx context.Context, fn content.WalkFunc, filters ...string) error {
	return s.inner.Walk(ctx, func(info content.Info) error {
		if !s.allowed[info.Digest] {
			return nil
		}
		return fn(info)
	}, filters...)
}

func (s *readOnlyStore) Update(context.Context, content.Info, ...string) (content.Info, error) {
	return content.Info{}, errReadOnly
}

func (s *readOnlyStore) Delete(context.Context, digest.Digest) error { return errReadOnly }

func (s *readOnlyStore) Writer(context.Context, ...content.WriterOpt) (content.Writer, error) {
	return nil, errReadOnly
}

func (s *readOnlyStore) Abort(context.Context, string) error { return errReadOnly }

// Status and ListStatuses report ingestions, which this store never has.
func (s *readOnlyStore) Status(_ context.Context, ref string) (content.Status, error) {
	return content.Status{}, fmt.Errorf("ingestion %s: %w", ref, cerrdefs.ErrNotFound)
}

func (s *readOnlyStore) ListStatuses(context.Context, ...string) ([]content.Status, error) {
	return nil, nil
}

// OwnOrShared is the default rule for which of kiln's images a project's builds may use
// as bases: those named under the project (localhost/PROJECT/...) and those under no
// project's name (localhost/NAME:TAG). Another project's (localhost/OTHER/...) are
// refused. Registry namespaces (issue 13) replace this rule through Service.MayPull.
func OwnOrShared(project, ref string) error {
	repo := strings.TrimPrefix(ref, "localhost/")
	if ns, _, ok := strings.Cut(repo, "/"); ok && ns != project {
		return errdefs.Invalid("base image %s belongs to project %s: a build of %s may use images under localhost/%s/ and shared ones (localhost/NAME:TAG)", ref, ns, project, project)
	}
	return nil
}

// OwnNamespace is the default rule for what a project's builds may tag: images under
// the project's namespace (localhost/PROJECT/NAME:TAG), never another project's or a
// shared name.
func OwnNamespace(project, ref string) error {
	repo, ok := strings.CutPrefix(ref, "localhost/")
	if ns, _, _ := strings.Cut(repo, "/"); !ok || ns != project || !strings.Contains(repo, "/") {
		return errdefs.Invalid("a build of %s tags images under localhost/%s/ (like localhost/%s/web:v2)", project, project, project)
	}
	return nil
}
