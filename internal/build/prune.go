package build

import (
	"context"
	"encoding/json"
	"strings"

	"github.com/kilnhq/kiln/api"
)

// pruneImages deletes from the registry the images of the project's successful builds
// older than the KeepImages newest. Only images kiln built (labelled with the project
// and build) are touched: base images stay, and so does the layer cache. The registry
// frees the blobs at its next garbage collection.
func (s *Service) pruneImages(ctx context.Context, project string) {
	if s.KeepImages <= 0 {
		return
	}
	bs, err := s.Store.ListBuilds(ctx, project)
	if err != nil {
		return
	}
	kept := 0
	for _, b := range bs {
		if b.State != Succeeded || b.Host != s.Host {
			continue // another host's build pushed to that host's registry
		}
		var res api.BuildResult
		json.Unmarshal(b.Result, &res)
		if res.Image == "" || res.Pruned {
			continue
		}
		if kept < s.KeepImages {
			kept++
			continue
		}
		repos := map[string]bool{}
		for _, ref := range res.Pushed {
			if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
				ref = ref[:i]
			}
			repos[ref] = true
		}
		ok := true
		for repo := range repos {
			if err := s.Images.Delete(ctx, repo+"@"+res.Image); err != nil {
				s.logf("pruning the image of build %s (%s@%s): %v", b.ID, repo, res.Image, err)
				ok = false
			}
		}
		if !ok {
			continue
		}
		s.updateResult(ctx, b, func(r *api.BuildResult) { r.Pruned = true })
		s.logf("pruned the image of build %s of %s (%s): %d newer builds are kept", b.ID, project, res.Image, s.KeepImages)
	}
}
