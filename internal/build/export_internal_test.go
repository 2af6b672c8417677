package build

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	cerrdefs "github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// write sends a blob through a store as BuildKit's exporter does.
func write(ctx context.Context, st content.Ingester, b []byte) error {
	desc := ocispec.Descriptor{Digest: digest.FromBytes(b), Size: int64(len(b))}
	w, err := st.Writer(ctx, content.WithRef("export-"+desc.Digest.String()), content.WithDescriptor(desc))
	if err != nil {
		return err
	}
	defer w.Close()
	if _, err := w.Write(b); err != nil {
		return err
	}
	return w.Commit(ctx, desc.Size, desc.Digest)
}

// The builder may write blobs to its project's image store, up to the bound, and learns
// that one is there already; it can read, list, change or delete nothing.
func TestImageSinkIsWriteOnlyAndBounded(t *testing.T) {
	ctx := context.Background()
	s := &Service{Dir: t.TempDir(), MaxImageBytes: 100}
	_, sink, err := s.openImages("shop")
	if err != nil {
		t.Fatal(err)
	}
	blob := bytes.Repeat([]byte("a"), 60)
	if err := write(ctx, sink, blob); err != nil {
		t.Fatal(err)
	}
	if err := write(ctx, sink, blob); !cerrdefs.IsAlreadyExists(err) {
		t.Errorf("writing a blob that is there: %v, want already exists (so it is not sent)", err)
	}
	d := digest.FromBytes(blob)
	if _, err := sink.ReaderAt(ctx, ocispec.Descriptor{Digest: d}); !cerrdefs.IsPermissionDenied(err) {
		t.Errorf("read: %v", err)
	}
	if err := sink.Walk(ctx, func(content.Info) error { return nil }); !cerrdefs.IsPermissionDenied(err) {
		t.Errorf("walk: %v", err)
	}
	if err := sink.Delete(ctx, d); !cerrdefs.IsPermissionDenied(err) {
		t.Errorf("delete: %v", err)
	}
	if _, err := sink.Update(ctx, content.Info{Digest: d}); !cerrdefs.IsPermissionDenied(err) {
		t.Errorf("update: %v", err)
	}
	if err := write(ctx, sink, bytes.Repeat([]byte("b"), 60)); !cerrdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "100 bytes") {
		t.Errorf("writing past the bound: %v", err)
	}
	if got := sink.sent.Load(); got < 100 {
		t.Errorf("sent %d bytes, want the first blob's 60 and the refused write's", got)
	}
}

// exportTo writes img's blobs into the project's store as a builder would, less those
// in skip, and returns its manifest's digest.
func exportTo(t *testing.T, st content.Ingester, img v1.Image, skip map[v1.Hash]bool) string {
	t.Helper()
	ctx := context.Background()
	raw, _ := img.RawManifest()
	cfg, _ := img.RawConfigFile()
	blobs := [][]byte{raw, cfg}
	layers, _ := img.Layers()
	for _, l := range layers {
		dg, _ := l.Digest()
		if skip[dg] {
			continue
		}
		rc, _ := l.Compressed()
		var b bytes.Buffer
		b.ReadFrom(rc)
		rc.Close()
		blobs = append(blobs, b.Bytes())
	}
	for _, b := range blobs {
		if err := write(ctx, st, b); err != nil && !cerrdefs.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	dg, _ := img.Digest()
	return dg.String()
}

// The image is read back from what the builder sent, which is checked: a digest that
// names no manifest, or a manifest naming a blob never sent, fails the build.
func TestExportedImageIsChecked(t *testing.T) {
	ctx := context.Background()
	s := &Service{Dir: t.TempDir()}
	st, sink, err := s.openImages("shop")
	if err != nil {
		t.Fatal(err)
	}
	img, err := random.Image(512, 3)
	if err != nil {
		t.Fatal(err)
	}
	first, _ := img.Layers()
	missing, _ := first[0].Digest()
	dg := exportTo(t, sink, img, map[v1.Hash]bool{missing: true})
	if _, err := s.exportedImage(ctx, st, "shop", dg); err == nil || !strings.Contains(err.Error(), "did not send") {
		t.Errorf("an image missing a layer: %v", err)
	}
	cfg, _ := img.ConfigName()
	if _, err := s.exportedImage(ctx, st, "shop", cfg.String()); err == nil || !strings.Contains(err.Error(), "not an image manifest") {
		t.Errorf("a config given as the manifest: %v", err)
	}
	for _, bad := range []string{"", "sha256:zz", digest.FromString("never sent").String()} {
		if _, err := s.exportedImage(ctx, st, "shop", bad); err == nil {
			t.Errorf("manifest %q: no error", bad)
		}
	}
	exportTo(t, sink, img, nil)
	got, err := s.exportedImage(ctx, st, "shop", dg)
	if err != nil {
		t.Fatal(err)
	}
	if gd, _ := got.Digest(); gd.String() != dg {
		t.Errorf("read back %s, want %s", gd, dg)
	}
	// Only the last image stays.
	other, _ := random.Image(256, 1)
	od := exportTo(t, sink, other, nil)
	oimg, err := s.exportedImage(ctx, st, "shop", od)
	if err != nil {
		t.Fatal(err)
	}
	if err := keepOnly(ctx, st, oimg); err != nil {
		t.Fatal(err)
	}
	var left []string
	st.Walk(ctx, func(i content.Info) error { left = append(left, i.Digest.String()); return nil })
	if len(left) != 3 {
		b, _ := json.Marshal(left)
		t.Errorf("after keepOnly the store holds %s, want the last image's manifest, config and layer", b)
	}
}
