package image

import (
	"archive/tar"
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Registries finds images: in kiln's built-in registry for references whose registry is
// "localhost" (Docker's name for "this host") or the built-in registry's own address, and
// in the named registry otherwise.
type Registries struct {
	// Local is the built-in registry's host:port.
	Local string
	// Token authenticates to the built-in registry.
	Token string
	// Peers, if set, lists the other hosts' registries (host:port of their peer
	// listeners), tried in turn for a localhost/ image this one lacks.
	Peers func(ctx context.Context) []string
	// PeerTransport carries the pulls from Peers: over the cluster's mutual TLS, this
	// host's certificate standing for it, and no token.
	PeerTransport http.RoundTripper

	// transport, if set, reaches Local in place of the token: Local is then a peer.
	transport http.RoundTripper
}

// NormalizeRef parses a reference; "app:1" means Docker Hub's library/app:1, as with
// docker, and "localhost/app:1" means the built-in registry.
func NormalizeRef(ref string) (string, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return "", errdefs.Wrap(errdefs.ErrInvalid, err, "image reference %q", ref)
	}
	return r.Name(), nil
}

// LocalRepo says whether ref names an image of the built-in registry (as localhost/...
// or by the registry's own address), and its repository there (without a tag).
func (r Registries) LocalRepo(ref string) (string, bool) {
	parsed, err := name.ParseReference(ref)
	if err != nil {
		return "", false
	}
	if reg := parsed.Context().RegistryStr(); reg != "localhost" && (r.Local == "" || reg != r.Local) {
		return "", false
	}
	return parsed.Context().RepositoryStr(), true
}

// where returns the reference to fetch ref from and the options to do it with.
func (r Registries) where(ctx context.Context, ref string) (name.Reference, []remote.Option, error) {
	parsed, err := name.ParseReference(ref)
	if err != nil {
		return nil, nil, errdefs.Wrap(errdefs.ErrInvalid, err, "image reference %q", ref)
	}
	reg := parsed.Context().RegistryStr()
	if reg == "localhost" || reg == r.Local {
		local := r.Local + "/" + parsed.Context().RepositoryStr()
		if d, ok := parsed.(name.Digest); ok {
			local += "@" + d.DigestStr()
		} else {
			local += ":" + parsed.Identifier()
		}
		lr, err := name.ParseReference(local, name.Insecure)
		if err != nil {
			return nil, nil, err
		}
		if r.transport != nil {
			return lr, []remote.Option{remote.WithContext(ctx), remote.WithTransport(r.transport)}, nil
		}
		return lr, []remote.Option{remote.WithContext(ctx), remote.WithAuth(&authn.Basic{Username: "kiln", Password: r.Token})}, nil
	}
	return parsed, []remote.Option{remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain)}, nil
}

// Resolve fetches an image's manifest; its layers are read when the image is converted.
// A localhost/ image this host's registry lacks is looked for in the Peers' registries
// (the other hosts sharing its database), so a machine placed here finds an image loaded
// through another host.
func (r Registries) Resolve(ctx context.Context, ref string) (v1.Image, error) {
	img, err := r.resolve(ctx, ref)
	if err == nil || !errors.Is(err, errdefs.ErrNotFound) || r.Peers == nil {
		return img, err
	}
	parsed, perr := name.ParseReference(ref)
	if perr != nil || parsed.Context().RegistryStr() != "localhost" {
		return img, err
	}
	for _, peer := range r.Peers(ctx) {
		if pimg, perr := (Registries{Local: peer, transport: r.PeerTransport}).resolve(ctx, ref); perr == nil {
			return pimg, nil
		}
	}
	return img, err
}

func (r Registries) resolve(ctx context.Context, ref string) (v1.Image, error) {
	where, opts, err := r.where(ctx, ref)
	if err != nil {
		return nil, err
	}
	img, err := remote.Image(where, opts...)
	if err != nil {
		var te *transport.Error
		if errors.As(err, &te) && (te.StatusCode == http.StatusNotFound || te.StatusCode == http.StatusUnauthorized && where.Context().RegistryStr() != r.Local) {
			return nil, errdefs.New(errdefs.ErrNotFound, "image %s not found: load it with `kiln image load FILE.tar` or push it to the registry", ref)
		}
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "fetching image %s", ref)
	}
	return img, nil
}

// Load pushes the image in a tarball to the built-in registry under the references it
// was saved with plus extra ones (which, like those, must name localhost).
func (r Registries) Load(ctx context.Context, tarballPath string, extra ...string) (digest string, refs []string, err error) {
	return r.LoadAs(ctx, tarballPath, tarballPath, nil, extra...)
}

// LoadAs is Load with errors calling the tarball name ("the upload" for a server's
// temporary copy of one, whose path means nothing to the user who sent it). If allow is
// set, every repository the image would be stored under must pass it before any is
// written.
func (r Registries) LoadAs(ctx context.Context, tarballPath, name string, allow func(repo string) error, extra ...string) (digest string, refs []string, err error) {
	img, closeImg, err := openTarball(tarballPath, name)
	if err != nil {
		return "", nil, err
	}
	defer closeImg()
	refs = append(savedRefs(tarballPath), extra...)
	if len(refs) == 0 {
		return "", nil, errdefs.Invalid("%s names no image reference: tag it when saving (docker save app:1), or pass --ref localhost/app:1", name)
	}
	return r.push(ctx, img, refs, allow)
}

// Push stores img in the built-in registry under refs, which must name localhost. The
// registry is asked for each blob first (go-containerregistry's HEAD), so only the
// blobs it lacks are sent.
func (r Registries) Push(ctx context.Context, img v1.Image, refs ...string) (digest string, pushed []string, err error) {
	return r.push(ctx, img, append([]string(nil), refs...), nil)
}

func (r Registries) push(ctx context.Context, img v1.Image, refs []string, allow func(repo string) error) (string, []string, error) {
	d, err := img.Digest()
	if err != nil {
		return "", nil, err
	}
	for i, ref := range refs {
		if refs[i], err = r.localRef(ref); err != nil {
			return "", nil, err
		}
		if allow != nil {
			repo, _ := r.LocalRepo(refs[i])
			if err := allow(repo); err != nil {
				return "", nil, err
			}
		}
	}
	for _, ref := range refs {
		where, opts, err := r.where(ctx, ref)
		if err != nil {
			return "", nil, err
		}
		if err := remote.Write(where, img, opts...); err != nil {
			return "", nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "storing %s in the built-in registry", ref)
		}
	}
	return d.String(), refs, nil
}

// localRef names ref in the built-in registry: "app:1" (as docker save writes it) and
// "localhost/app:1" both become localhost/app:1; a name of another registry is refused.
func (r Registries) localRef(ref string) (string, error) {
	p, err := name.NewTag(ref)
	if err != nil {
		return "", errdefs.Wrap(errdefs.ErrInvalid, err, "image reference %q (give a tag, like localhost/app:1)", ref)
	}
	repo := p.Context().RepositoryStr()
	first, _, hasSlash := strings.Cut(ref, "/")
	explicit := hasSlash && (strings.ContainsAny(first, ".:") || first == "localhost")
	switch reg := p.Context().RegistryStr(); {
	case reg == "localhost" || reg == r.Local:
	case reg == name.DefaultRegistry && !explicit:
		repo = strings.TrimPrefix(repo, "library/")
	default:
		return "", errdefs.Invalid("image reference %s names registry %s: kiln loads images into its own registry, name them localhost/NAME:TAG", ref, reg)
	}
	return "localhost/" + repo + ":" + p.TagStr(), nil
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
			if r := idx.Manifests[0].Annotations["org.opencontainers.image.ref.name"]; r != "" && strings.ContainsAny(r, "/:") {
				return []string{r}
			}
			return nil
		}
	}
}

// Delete removes a manifest (REPO@DIGEST) from the built-in registry; the registry's
// garbage collection frees its blobs.
func (r Registries) Delete(ctx context.Context, ref string) error {
	where, opts, err := r.where(ctx, ref)
	if err != nil {
		return err
	}
	if _, ok := where.(name.Digest); !ok {
		return errdefs.Invalid("delete %s: name the image by digest (REPO@sha256:...)", ref)
	}
	return remote.Delete(where, opts...)
}
