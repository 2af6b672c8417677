package server

import (
	"io"
	"net/http"
	"os"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// loadImage stores an uploaded `docker save` or OCI layout tarball; ?ref= adds a name.
func (s *Server) loadImage(w http.ResponseWriter, r *http.Request) error {
	max := s.MaxImageBytes
	if max == 0 {
		max = 8 << 30
	}
	f, err := os.CreateTemp("", "kiln-upload-*.tar")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	n, err := io.Copy(f, io.LimitReader(r.Body, max+1))
	if err != nil {
		return err
	}
	if n > max {
		return errdefs.Invalid("image tarball is larger than the %d bytes this server accepts", max)
	}
	var extra []string
	if ref := r.URL.Query().Get("ref"); ref != "" {
		extra = append(extra, ref)
	}
	// Errors say "the upload": the temporary file's path means nothing to the caller,
	// who names the file it sent (as the CLI does).
	id, _ := auth.From(r.Context())
	allow := func(repo string) error { return s.ImageRules.MayPush(id, repo) }
	digest, refs, err := s.Images.LoadAs(r.Context(), f.Name(), "the upload", allow, extra...)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.ImageLoadResponse{Digest: digest, Refs: refs})
	return nil
}

// mayUseImage checks that the caller may run ref: an image of another registry, or one
// of kiln's registry the caller's token may pull.
func (s *Server) mayUseImage(r *http.Request, ref string) error {
	if s.Images == nil {
		return nil
	}
	repo, local := s.Images.LocalRepo(ref)
	if !local {
		return nil
	}
	id, _ := auth.From(r.Context())
	return s.ImageRules.MayPull(id, repo)
}
