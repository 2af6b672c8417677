package build

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/plugins/content/local"
	cerrdefs "github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/types"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// A build's image comes back from the builder into a content store of its project's on
// this host, which keeps the blobs of the project's last built image. BuildKit asks the
// store for a writer per blob and skips those it already holds, so a rebuild sends only
// the blobs that changed (for a rebuild with no change: a new config and manifest, a
// few kB, where an OCI tarball carried every layer again). The push to kiln's registry
// then asks the registry for each blob before sending it.

// defaultMaxImageBytes bounds what one build's builder may send for its image when
// Service.MaxImageBytes is unset; it matches the largest image tarball the API takes.
const defaultMaxImageBytes = 8 << 30

// maxManifestBytes bounds the manifest read back from the builder's export.
const maxManifestBytes = 4 << 20

// imagesDir is the project's image store on this host.
func (s *Service) imagesDir(project string) string { return filepath.Join(s.Dir, "images", project) }

func (s *Service) maxImageBytes() int64 {
	if s.MaxImageBytes > 0 {
		return s.MaxImageBytes
	}
	return defaultMaxImageBytes
}

// imageSink is the content store one build's session offers BuildKit for its image. The
// builder runs the project's code, so it is hostile: it may write blobs, max bytes in
// all, and learn whether a blob is already in its own project's store; it can read,
// list, change or delete nothing.
type imageSink struct {
	inner content.Store
	max   int64
	sent  atomic.Int64
}

var _ content.Store = (*imageSink)(nil)

// errWriteOnly is containerd's kind, which the session's gRPC server maps to
// PermissionDenied for BuildKit.
var errWriteOnly = fmt.Errorf("a build's image store only takes blobs: %w", cerrdefs.ErrPermissionDenied)

// Info answers whether a blob is here: the session's server asks it when a commit finds
// the blob already written.
func (s *imageSink) Info(ctx context.Context, d digest.Digest) (content.Info, error) {
	return s.inner.Info(ctx, d)
}

// Writer takes a blob, or says it is here already (ErrAlreadyExists), which is what
// saves sending it.
func (s *imageSink) Writer(ctx context.Context, opts ...content.WriterOpt) (content.Writer, error) {
	w, err := s.inner.Writer(ctx, opts...)
	if err != nil {
		return nil, err
	}
	return &countedWriter{Writer: w, sink: s}, nil
}

func (s *imageSink) Status(ctx context.Context, ref string) (content.Status, error) {
	return s.inner.Status(ctx, ref)
}

func (s *imageSink) Abort(ctx context.Context, ref string) error { return s.inner.Abort(ctx, ref) }

func (s *imageSink) ListStatuses(context.Context, ...string) ([]content.Status, error) {
	return nil, nil
}

func (s *imageSink) ReaderAt(context.Context, ocispec.Descriptor) (content.ReaderAt, error) {
	return nil, errWriteOnly
}

func (s *imageSink) Walk(context.Context, content.WalkFunc, ...string) error { return errWriteOnly }

func (s *imageSink) Update(context.Context, content.Info, ...string) (content.Info, error) {
	return content.Info{}, errWriteOnly
}

func (s *imageSink) Delete(context.Context, digest.Digest) error { return errWriteOnly }

// countedWriter counts what the builder sends against its sink's bound.
type countedWriter struct {
	content.Writer
	sink *imageSink
}

func (w *countedWriter) Write(p []byte) (int, error) {
	if w.sink.sent.Add(int64(len(p))) > w.sink.max {
		// InvalidArgument: the build's own failure, not one of the infrastructure.
		return 0, fmt.Errorf("the image is larger than the %d bytes a build may send: %w", w.sink.max, cerrdefs.ErrInvalidArgument)
	}
	return w.Writer.Write(p)
}

// openImages opens the project's image store; sink is the view of it a build's session
// gets.
func (s *Service) openImages(project string) (content.Store, *imageSink, error) {
	dir := s.imagesDir(project)
	if err := os.MkdirAll(filepath.Join(dir, "blobs"), 0o755); err != nil {
		return nil, nil, err
	}
	st, err := local.NewStore(dir)
	if err != nil {
		return nil, nil, err
	}
	return st, &imageSink{inner: st, max: s.maxImageBytes()}, nil
}

// exportedImage reads the image whose manifest the builder exported into the project's
// store. The digest comes from the builder, so it is checked: the store verified every
// blob against its digest as it was written, and the blob must be an image manifest.
func (s *Service) exportedImage(ctx context.Context, st content.Store, project, manifest string) (v1.Image, error) {
	dg, err := digest.Parse(manifest)
	if err != nil {
		return nil, fmt.Errorf("the builder exported the image as %q: %w", manifest, err)
	}
	info, err := st.Info(ctx, dg)
	if err != nil {
		return nil, fmt.Errorf("the builder did not export the image's manifest %s: %w", dg, err)
	}
	if info.Size > maxManifestBytes {
		return nil, fmt.Errorf("the image's manifest is %d bytes, more than %d", info.Size, maxManifestBytes)
	}
	ra, err := st.ReaderAt(ctx, ocispec.Descriptor{Digest: dg, Size: info.Size})
	if err != nil {
		return nil, err
	}
	raw, err := io.ReadAll(content.NewReader(ra))
	ra.Close()
	if err != nil {
		return nil, err
	}
	var m struct {
		MediaType types.MediaType `json:"mediaType"`
	}
	if err := json.Unmarshal(raw, &m); err != nil || !m.MediaType.IsImage() {
		return nil, fmt.Errorf("the builder exported %s, which is not an image manifest", dg)
	}
	h, err := v1.NewHash(dg.String())
	if err != nil {
		return nil, err
	}
	// The store's directory is an OCI layout once its index names the image.
	dir := s.imagesDir(project)
	idx, _ := json.Marshal(v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex,
		Manifests: []v1.Descriptor{{MediaType: m.MediaType, Size: info.Size, Digest: h}}})
	for name, b := range map[string][]byte{"oci-layout": []byte(`{"imageLayoutVersion":"1.0.0"}`), "index.json": idx} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return nil, err
		}
	}
	p, err := layout.FromPath(dir)
	if err != nil {
		return nil, err
	}
	img, err := p.Image(h)
	if err != nil {
		return nil, err
	}
	// Every blob the manifest names must have come: the push reads them from here.
	mf, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("the image's manifest %s: %w", dg, err)
	}
	for _, d := range append([]v1.Descriptor{mf.Config}, mf.Layers...) {
		if _, err := st.Info(ctx, digest.Digest(d.Digest.String())); err != nil {
			return nil, fmt.Errorf("the image's manifest names blob %s, which the builder did not send: %w", d.Digest, err)
		}
	}
	return img, nil
}

// keepOnly empties the project's store of all but img's blobs, and of writes the
// builder left unfinished: the store holds the last image built, which is what the
// next build compares its blobs with.
func keepOnly(ctx context.Context, st content.Store, img v1.Image) error {
	keep := map[digest.Digest]bool{}
	dg, err := img.Digest()
	if err != nil {
		return err
	}
	m, err := img.Manifest()
	if err != nil {
		return err
	}
	keep[digest.Digest(dg.String())] = true
	keep[digest.Digest(m.Config.Digest.String())] = true
	for _, l := range m.Layers {
		keep[digest.Digest(l.Digest.String())] = true
	}
	var drop []digest.Digest
	if err := st.Walk(ctx, func(info content.Info) error {
		if !keep[info.Digest] {
			drop = append(drop, info.Digest)
		}
		return nil
	}); err != nil {
		return err
	}
	for _, d := range drop {
		if err := st.Delete(ctx, d); err != nil && !cerrdefs.IsNotFound(err) {
			return err
		}
	}
	unfinished, err := st.ListStatuses(ctx)
	if err != nil {
		return err
	}
	for _, w := range unfinished {
		st.Abort(ctx, w.Ref)
	}
	return nil
}
