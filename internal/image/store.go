package image

import (
	"archive/tar"

	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/match"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kilnhq/kiln/internal/errdefs"
)

const refAnnotation = "org.opencontainers.image.ref.name"

// Store keeps loaded images on the host as an OCI image layout, each under the
// references it was saved with.
type Store struct {
	Dir string
	mu  sync.Mutex
}

func (s *Store) path() (layout.Path, error) {
	if p, err := layout.FromPath(s.Dir); err == nil {
		return p, nil
	}
	if err := os.MkdirAll(s.Dir, 0o755); err != nil {
		return "", err
	}
	return layout.Write(s.Dir, empty.Index)
}

// NormalizeRef parses a reference the way Docker does ("app:1" is docker.io/library/app:1
// there; kiln keeps whatever registry the name says, "localhost/app:1" stays so).
func NormalizeRef(ref string) (string, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return "", errdefs.Invalid("image reference %q: %v", ref, err)
	}
	return r.Name(), nil
}

// Load stores the image in a tarball under its saved references plus extra ones.
func (s *Store) Load(tarballPath string, extra ...string) (digest string, refs []string, err error) {
	img, closeImg, err := OpenTarball(tarballPath)
	if err != nil {
		return "", nil, err
	}
	defer closeImg()
	refs = append(savedRefs(tarballPath), extra...)
	if len(refs) == 0 {
		return "", nil, errdefs.Invalid("%s names no image reference: tag it when saving, or give one", tarballPath)
	}
	for i, r := range refs {
		if refs[i], err = NormalizeRef(r); err != nil {
			return "", nil, err
		}
	}
	d, err := img.Digest()
	if err != nil {
		return "", nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := s.path()
	if err != nil {
		return "", nil, err
	}
	for _, r := range refs {
		if err := p.ReplaceImage(img, match.Annotation(refAnnotation, r), layout.WithAnnotations(map[string]string{refAnnotation: r})); err != nil {
			return "", nil, err
		}
	}
	return d.String(), refs, nil
}

// savedRefs reads the references a tarball was saved under.
func savedRefs(path string) []string {
	if hasEntry(path, "manifest.json") {
		m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(path) })
		if err == nil && len(m) == 1 {
			return m[0].RepoTags
		}
		return nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err != nil {
			return nil
		}
		if filepath.Clean(h.Name) == "index.json" {
			idx, err := v1.ParseIndexManifest(tr)
			if err != nil || len(idx.Manifests) != 1 {
				return nil
			}
			if r := idx.Manifests[0].Annotations[refAnnotation]; r != "" && strings.ContainsAny(r, "/:") {
				return []string{r}
			}
			return nil
		}
	}
}

// Resolve finds a stored image by reference or digest.
func (s *Store) Resolve(ref string) (v1.Image, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := layout.FromPath(s.Dir)
	if err != nil {
		return nil, errdefs.New(errdefs.ErrNotFound, "image %s is not loaded: load it with `kiln image load FILE.tar`", ref)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		return nil, err
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	want, nerr := NormalizeRef(ref)
	for _, d := range im.Manifests {
		if (nerr == nil && d.Annotations[refAnnotation] == want) || d.Digest.String() == ref || strings.HasSuffix(ref, "@"+d.Digest.String()) {
			return idx.Image(d.Digest)
		}
	}
	if nerr != nil {
		return nil, nerr
	}
	return nil, errdefs.New(errdefs.ErrNotFound, "image %s is not loaded: load it with `kiln image load FILE.tar`", ref)
}
