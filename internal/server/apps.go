package server

import (
	"net/http"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
)

func (s *Server) listApps(w http.ResponseWriter, r *http.Request) error {
	names, err := s.Store.ListApps(r.Context())
	if err != nil {
		return err
	}
	apps := []api.App{}
	for _, n := range names {
		if machine.InternalApp(n) {
			continue
		}
		apps = append(apps, api.App{Name: n})
	}
	writeJSON(w, http.StatusOK, apps)
	return nil
}

func (s *Server) createApp(w http.ResponseWriter, r *http.Request) error {
	var req api.CreateAppRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	if !appNameOK(req.AppName) {
		return errdefs.Invalid("app_name %q: use lowercase letters, digits and dashes, up to 63", req.AppName)
	}
	if err := s.Store.CreateApp(r.Context(), req.AppName); err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, api.App{Name: req.AppName})
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
	app := r.PathValue("app")
	if _, err := s.Store.ListMachines(r.Context(), app); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.App{Name: app})
	return nil
}
