package server

import (
	"context"
	"errors"
	"net/http"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
)

// org is the one organization kiln shows Fly's clients; their org_slug is accepted and
// ignored.
var org = api.Organization{Name: "kiln", Slug: "personal"}

func (s *Server) listApps(w http.ResponseWriter, r *http.Request) error {
	names, err := s.Store.ListApps(r.Context())
	if err != nil {
		return err
	}
	out := api.AppList{Apps: []api.App{}}
	id, _ := auth.From(r.Context())
	for _, n := range names {
		if machine.InternalApp(n) || !id.Reaches(auth.App(n)) {
			continue
		}
		a, err := s.app(r.Context(), n)
		if err != nil {
			return err
		}
		out.Apps = append(out.Apps, a)
	}
	out.TotalApps = len(out.Apps)
	writeJSON(w, http.StatusOK, out)
	return nil
}

// app shows an app in Fly's shape, with what it holds.
func (s *Server) app(ctx context.Context, name string) (api.App, error) {
	a := api.App{ID: name, Name: name, Status: "pending", Network: "default", Organization: org}
	ms, err := s.Store.ListMachines(ctx, name)
	if err != nil {
		return a, err
	}
	for _, m := range ms {
		if m.State != machine.Destroyed {
			a.MachineCount++
		}
		if m.State == machine.Started {
			a.Status = "deployed"
		}
	}
	vs, err := s.Store.ListVolumes(ctx, name)
	a.VolumeCount = len(vs)
	return a, err
}

func (s *Server) createApp(w http.ResponseWriter, r *http.Request) error {
	var req api.CreateAppRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	name := req.AppName
	if name == "" {
		name = req.Name
	}
	if !appNameOK(name) {
		return errdefs.Invalid("app_name %q: use lowercase letters, digits and dashes, up to 63", name)
	}
	// A token creates only apps it reaches: one scoped to web may create web.
	if id, _ := auth.From(r.Context()); !id.May(auth.App(name), auth.Deploy) {
		return errdefs.New(errdefs.ErrForbidden, "token %s (%s) cannot create app %s: a token creates only the apps it deploys to", id.TokenID, id.Describe(), name)
	}
	if err := s.Store.CreateApp(r.Context(), name); err != nil {
		return err
	}
	a, err := s.app(r.Context(), name)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, a)
	return nil
}

func appNameOK(n string) bool {
	if n == "" || len(n) > 63 {
		return false
	}
	for i, c := range n {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' && i > 0) {
			return false
		}
	}
	return true
}

func (s *Server) getApp(w http.ResponseWriter, r *http.Request) error {
	a, err := s.app(r.Context(), r.PathValue("app"))
	if errors.Is(err, errdefs.ErrNotFound) {
		// Fly's words exactly: its client tells a free name by this message.
		return errdefs.New(errdefs.ErrNotFound, "app not found")
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, a)
	return nil
}

// deleteApp deletes an app; with force=true its machines and volumes go first.
func (s *Server) deleteApp(w http.ResponseWriter, r *http.Request) error {
	if err := s.Node.DeleteApp(r.Context(), r.PathValue("app"), r.URL.Query().Get("force") == "true"); err != nil {
		return err
	}
	w.WriteHeader(http.StatusAccepted)
	return nil
}
