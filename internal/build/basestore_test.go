package build_test

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"sort"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	cerrdefs "github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/testutil"
)

// blobsOf lists the digests of an image's manifest, config and layers.
func blobsOf(t *testing.T, img v1.Image) []digest.Digest {
	t.Helper()
	dg, _ := img.Digest()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	out := []digest.Digest{digest.Digest(dg.String()), digest.Digest(m.Config.Digest.String())}
	for _, l := range m.Layers {
		out = append(out, digest.Digest(l.Digest.String()))
	}
	return out
}

// A build's view of the shared base store shows its own base images only, and refuses
// every change: another project's base can be neither read, listed, overwritten nor
// deleted through the build's session.
func TestBaseViewIsReadOnlyAndFiltered(t *testing.T) {
	ctx := context.Background()
	bases := &build.Bases{Dir: filepath.Join(testutil.TempDir(t), "bases")}
	mine, _ := random.Image(512, 2)
	theirs, _ := random.Image(512, 2)
	mineDg, err := bases.Add(mine)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bases.Add(theirs); err != nil {
		t.Fatal(err)
	}
	st, err := bases.View([]v1.Hash{mineDg})
	if err != nil {
		t.Fatal(err)
	}

	for _, d := range blobsOf(t, mine) {
		if _, err := st.Info(ctx, d); err != nil {
			t.Errorf("Info of the build's own blob %s: %v", d, err)
		}
		if b, err := content.ReadBlob(ctx, st, ocispec.Descriptor{Digest: d}); err != nil || digest.FromBytes(b) != d {
			t.Errorf("reading the build's own blob %s: %v", d, err)
		}
	}
	for _, d := range blobsOf(t, theirs) {
		if _, err := st.Info(ctx, d); !errors.Is(err, cerrdefs.ErrNotFound) {
			t.Errorf("Info of another image's blob %s: %v, want not found", d, err)
		}
		if _, err := st.ReaderAt(ctx, ocispec.Descriptor{Digest: d}); !errors.Is(err, cerrdefs.ErrNotFound) {
			t.Errorf("reading another image's blob %s: %v, want not found", d, err)
		}
	}

	var listed []string
	if err := st.Walk(ctx, func(i content.Info) error { listed = append(listed, i.Digest.String()); return nil }); err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, d := range blobsOf(t, mine) {
		want = append(want, d.String())
	}
	sort.Strings(listed)
	sort.Strings(want)
	if !slices.Equal(listed, want) {
		t.Errorf("Walk lists %v, want the build's own blobs %v", listed, want)
	}

	own := blobsOf(t, mine)[2]
	if err := st.Delete(ctx, own); !errors.Is(err, cerrdefs.ErrPermissionDenied) {
		t.Errorf("Delete: %v, want permission denied", err)
	}
	if err := st.Delete(ctx, blobsOf(t, theirs)[2]); !errors.Is(err, cerrdefs.ErrPermissionDenied) {
		t.Errorf("Delete of another image's layer: %v, want permission denied", err)
	}
	if _, err := st.Writer(ctx, content.WithRef("x")); !errors.Is(err, cerrdefs.ErrPermissionDenied) {
		t.Errorf("Writer: %v, want permission denied", err)
	}
	if _, err := st.Update(ctx, content.Info{Digest: own, Labels: map[string]string{"a": "b"}}, "labels.a"); !errors.Is(err, cerrdefs.ErrPermissionDenied) {
		t.Errorf("Update: %v, want permission denied", err)
	}
	if err := st.Abort(ctx, "x"); !errors.Is(err, cerrdefs.ErrPermissionDenied) {
		t.Errorf("Abort: %v, want permission denied", err)
	}
	// Nothing changed underneath: the layer the build tried to delete still reads whole.
	if b, err := content.ReadBlob(ctx, st, ocispec.Descriptor{Digest: own}); err != nil || digest.FromBytes(b) != own {
		t.Errorf("the layer the build tried to delete: %v", err)
	}
}

// A project's builds may use its own images and shared ones, not another project's.
func TestOwnOrShared(t *testing.T) {
	for _, c := range []struct {
		ref string
		ok  bool
	}{
		{"localhost/busybox:1", true},
		{"localhost/shop/base:1", true},
		{"localhost/shop/tools/go:1", true},
		{"localhost/other/base:1", false},
	} {
		if err := build.OwnOrShared("shop", c.ref); (err == nil) != c.ok {
			t.Errorf("%s: %v, want allowed %v", c.ref, err, c.ok)
		}
	}
}
