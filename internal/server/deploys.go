package server

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/appconfig"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/deploy"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

// MaxConfigBytes bounds a deploy's config file: each release keeps it.
const MaxConfigBytes = 128 << 10

func (s *Server) deploysOn() error {
	if s.Deploys == nil {
		return errdefs.New(errdefs.ErrNotImplemented, "deploys are off on this server: it was started without a secrets key")
	}
	return nil
}

// releaseAPI is a release as the API shows it.
func releaseAPI(rel store.Release) api.Release {
	var spec deploy.Spec
	json.Unmarshal(rel.Config, &spec)
	return api.Release{App: rel.App, Version: rel.Version, State: rel.State, Strategy: rel.Strategy, Image: rel.Image,
		SecretsVersion: rel.SecretsVersion, Counts: spec.Counts, Token: rel.Token, RollbackOf: rel.RollbackOf, Message: rel.Message,
		CreatedAt: rel.CreatedAt, UpdatedAt: rel.UpdatedAt}
}

func planAPI(p deploy.Plan) api.Plan {
	out := api.Plan{Strategy: p.Strategy, Steps: []api.PlanStep{}}
	for _, st := range p.Steps {
		ps := api.PlanStep{Group: st.Group, Machine: st.Machine, Change: string(st.Change)}
		for _, d := range st.Diff {
			ps.Diff = append(ps.Diff, api.FieldDiff(d))
		}
		out.Steps = append(out.Steps, ps)
	}
	raw, _ := json.Marshal(out)
	sum := sha256.Sum256(raw)
	out.Digest = hex.EncodeToString(sum[:8])
	return out
}

// latestSpec is the app's latest release that succeeded (before a version, if not 0),
// with its spec; ErrNotFound when it has none.
func (s *Server) latestSpec(r *http.Request, app string, before int) (store.Release, deploy.Spec, error) {
	rels, err := s.Deploys.Store.ListReleases(r.Context(), app, 0)
	if err != nil {
		return store.Release{}, deploy.Spec{}, err
	}
	for _, rel := range rels {
		if rel.State == store.ReleaseSucceeded && (before == 0 || rel.Version < before) {
			var spec deploy.Spec
			if err := json.Unmarshal(rel.Config, &spec); err != nil {
				return rel, spec, errdefs.Wrap(errdefs.ErrInvalid, err, "release %d's stored spec", rel.Version)
			}
			return rel, spec, nil
		}
	}
	if before > 0 {
		return store.Release{}, deploy.Spec{}, errdefs.New(errdefs.ErrNotFound, "app %s has no release before %d that succeeded: nothing to roll back to", app, before)
	}
	return store.Release{}, deploy.Spec{}, errdefs.New(errdefs.ErrNotFound, "app %s has no release that succeeded: deploy it first (kiln deploy)", app)
}

// deploySpec reads a deploy or plan request into the spec it asks for.
func (s *Server) deploySpec(r *http.Request, req *api.DeployRequest) (deploy.Spec, error) {
	app := r.PathValue("app")
	if _, err := s.Store.ListMachines(r.Context(), app); err != nil {
		return deploy.Spec{}, err
	}
	if err := decode(r, req); err != nil {
		return deploy.Spec{}, err
	}
	if len(req.Config) > MaxConfigBytes {
		return deploy.Spec{}, errdefs.Invalid("config is %d KiB, over the limit of %d KiB: an app's fly.toml is far smaller", len(req.Config)>>10, MaxConfigBytes>>10)
	}
	name := filepath.Base(req.ConfigName)
	if req.ConfigName == "" || len(name) > 64 {
		name = "fly.toml"
	}
	cfg, err := appconfig.Parse(name, []byte(req.Config))
	if err != nil {
		return deploy.Spec{}, errdefs.Wrap(errdefs.ErrInvalid, err, "config")
	}
	if err := cfg.InlineLocalFiles(req.LocalFiles); err != nil {
		return deploy.Spec{}, err
	}
	if cfg.App != app {
		return deploy.Spec{}, errdefs.Invalid("%s says app = %q, but this deploy is to app %s: deploy with --app %s, or fix the file", name, cfg.App, app, cfg.App)
	}
	if req.Strategy != "" {
		if !slices.Contains(appconfig.Strategies, req.Strategy) {
			return deploy.Spec{}, errdefs.Invalid("strategy %q is not a deploy strategy: use one of %s", req.Strategy, strings.Join(appconfig.Strategies, ", "))
		}
		if len(cfg.Mounts) > 0 && (req.Strategy == "canary" || req.Strategy == "bluegreen") {
			return deploy.Spec{}, errdefs.Invalid("strategy %s cannot be used with [mounts]: Fly refuses it too: a volume cannot be attached to two machines at once; use rolling or immediate", req.Strategy)
		}
		cfg.Deploy.Strategy = req.Strategy
	}
	image := req.Image
	if image == "" && cfg.Build != nil {
		image = cfg.Build.Image
	}
	if image == "" {
		return deploy.Spec{}, errdefs.Invalid("no image to deploy: give one (kiln deploy builds [build]'s Dockerfile and sends its digest), or set [build] image")
	}
	spec := deploy.Spec{Config: *cfg, Image: image, Counts: map[string]int{}}
	_, last, err := s.latestSpec(r, app, 0)
	ok := err == nil
	if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		return spec, err
	}
	for _, g := range cfg.Groups() {
		switch n, given := req.Counts[g]; {
		case given:
			if n < 0 || n > 100 {
				return spec, errdefs.Invalid("count %d for process group %s: give 0 to 100", n, g)
			}
			spec.Counts[g] = n
		case ok && hasCount(last.Counts, g): // 0 too: a group scaled to zero stays there
			spec.Counts[g] = last.Counts[g]
		case cfg.Kiln.Counts[g] > 0:
			spec.Counts[g] = cfg.Kiln.Counts[g]
		default:
			spec.Counts[g] = 1
		}
	}
	for g := range req.Counts {
		if _, ok := spec.Counts[g]; !ok {
			return spec, errdefs.Invalid("count for process group %q: %s has no such group (it has %v)", g, name, cfg.Groups())
		}
	}
	return spec, nil
}

func hasCount(counts map[string]int, g string) bool {
	_, ok := counts[g]
	return ok
}

func (s *Server) planDeploy(w http.ResponseWriter, r *http.Request) error {
	if err := s.deploysOn(); err != nil {
		return err
	}
	spec, err := s.deploySpec(r, &api.DeployRequest{})
	if err != nil {
		return err
	}
	if err := s.mayUseImage(r, spec.Image); err != nil {
		return err
	}
	p, err := s.Deploys.Plan(r.Context(), r.PathValue("app"), spec)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, planAPI(p))
	return nil
}

func (s *Server) startDeploy(w http.ResponseWriter, r *http.Request, spec deploy.Spec, rollbackOf int) error {
	// The caller must be allowed the image, as for a machine it creates: a rollback
	// or scale by another token of the app is checked again.
	if err := s.mayUseImage(r, spec.Image); err != nil {
		return err
	}
	id, _ := auth.From(r.Context())
	rel, p, err := s.Deploys.Deploy(r.Context(), r.PathValue("app"), spec, id.TokenID, rollbackOf)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, api.DeployResponse{Release: releaseAPI(rel), Plan: planAPI(p)})
	return nil
}

func (s *Server) createDeploy(w http.ResponseWriter, r *http.Request) error {
	if err := s.deploysOn(); err != nil {
		return err
	}
	var req api.DeployRequest
	spec, err := s.deploySpec(r, &req)
	if err != nil {
		return err
	}
	if req.ExpectPlan != "" {
		p, err := s.Deploys.Plan(r.Context(), r.PathValue("app"), spec)
		if err != nil {
			return err
		}
		if d := planAPI(p).Digest; d != req.ExpectPlan {
			return errdefs.New(errdefs.ErrConflict, "the plan is no longer the one approved (%s, now %s): the app's machines changed meanwhile; run kiln plan or kiln deploy again", req.ExpectPlan, d)
		}
	}
	return s.startDeploy(w, r, spec, 0)
}

func (s *Server) rollbackDeploy(w http.ResponseWriter, r *http.Request) error {
	if err := s.deploysOn(); err != nil {
		return err
	}
	app := r.PathValue("app")
	var req api.RollbackRequest
	if err := decodeOptional(r, &req); err != nil {
		return err
	}
	before := req.Version + 1 // that version itself
	if req.Version == 0 {
		latest, _, err := s.latestSpec(r, app, 0)
		if err != nil {
			return err
		}
		before = latest.Version
	}
	target, spec, err := s.latestSpec(r, app, before)
	if err != nil {
		return err
	}
	if req.Version > 0 && target.Version != req.Version {
		rel, err := s.Deploys.Store.GetRelease(r.Context(), app, req.Version)
		if err != nil {
			return err
		}
		return errdefs.Invalid("release %d %s: roll back to one that succeeded (kiln releases lists them)", rel.Version, rel.State)
	}
	return s.startDeploy(w, r, spec, target.Version)
}

func (s *Server) scaleDeploy(w http.ResponseWriter, r *http.Request) error {
	if err := s.deploysOn(); err != nil {
		return err
	}
	app := r.PathValue("app")
	var req api.ScaleRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	if req.Group == "" {
		req.Group = "app"
	}
	if req.Count < 0 || req.Count > 100 {
		return errdefs.Invalid("count %d: give 0 to 100", req.Count)
	}
	_, spec, err := s.latestSpec(r, app, 0)
	if err != nil {
		return err
	}
	if _, known := spec.Counts[req.Group]; !known {
		return errdefs.Invalid("process group %q: the app's release has %v (name one with --process)", req.Group, spec.Config.Groups())
	}
	counts := map[string]int{}
	for g, n := range spec.Counts {
		counts[g] = n
	}
	counts[req.Group] = req.Count
	spec.Counts = counts
	return s.startDeploy(w, r, spec, 0)
}

func (s *Server) listReleases(w http.ResponseWriter, r *http.Request) error {
	if err := s.deploysOn(); err != nil {
		return err
	}
	app := r.PathValue("app")
	if _, err := s.Store.ListMachines(r.Context(), app); err != nil {
		return err
	}
	rels, err := s.Deploys.Store.ListReleases(r.Context(), app, 100)
	if err != nil {
		return err
	}
	out := []api.Release{}
	for _, rel := range rels {
		out = append(out, releaseAPI(rel))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) getRelease(w http.ResponseWriter, r *http.Request) error {
	if err := s.deploysOn(); err != nil {
		return err
	}
	v, err := strconv.Atoi(r.PathValue("version"))
	if err != nil || v < 1 {
		return errdefs.Invalid("release version %q: give a number like 3", r.PathValue("version"))
	}
	rel, err := s.Deploys.Store.GetRelease(r.Context(), r.PathValue("app"), v)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, releaseAPI(rel))
	return nil
}

func (s *Server) listSecrets(w http.ResponseWriter, r *http.Request) error {
	if err := s.deploysOn(); err != nil {
		return err
	}
	app := r.PathValue("app")
	if _, err := s.Store.ListMachines(r.Context(), app); err != nil {
		return err
	}
	names, v, err := s.Secrets.Names(r.Context(), app)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.Secrets{Version: v, Names: names})
	return nil
}

func (s *Server) changeSecrets(w http.ResponseWriter, r *http.Request, set map[string]string, unset []string) error {
	app := r.PathValue("app")
	if _, err := s.Store.ListMachines(r.Context(), app); err != nil {
		return err
	}
	if _, err := s.Secrets.Change(r.Context(), app, set, unset); err != nil {
		return err
	}
	names, v, err := s.Secrets.Names(r.Context(), app)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.Secrets{Version: v, Names: names})
	return nil
}

func (s *Server) setSecrets(w http.ResponseWriter, r *http.Request) error {
	if err := s.deploysOn(); err != nil {
		return err
	}
	var req api.SecretsRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	if len(req.Values) == 0 {
		return errdefs.Invalid("values: give at least one NAME=value")
	}
	return s.changeSecrets(w, r, req.Values, nil)
}

func (s *Server) setSecret(w http.ResponseWriter, r *http.Request) error {
	if err := s.deploysOn(); err != nil {
		return err
	}
	var req api.SecretRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	return s.changeSecrets(w, r, map[string]string{r.PathValue("name"): req.Value}, nil)
}

func (s *Server) unsetSecret(w http.ResponseWriter, r *http.Request) error {
	if err := s.deploysOn(); err != nil {
		return err
	}
	return s.changeSecrets(w, r, nil, []string{r.PathValue("name")})
}
