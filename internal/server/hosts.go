package server

import (
	"net/http"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
)

func (s *Server) listLimits(w http.ResponseWriter, r *http.Request) error {
	if s.Limits == nil {
		writeJSON(w, http.StatusOK, []api.Limit{})
		return nil
	}
	out := []api.Limit{}
	for _, l := range s.Limits.All() {
		out = append(out, api.Limit(l))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) listHosts(w http.ResponseWriter, r *http.Request) error {
	if s.Capacity == nil {
		return errdefs.New(errdefs.ErrMissingDependency, "this server keeps no capacity ledger")
	}
	hosts, used := s.Capacity.Hosts()
	out := []api.Host{}
	for _, h := range hosts {
		u := used[h.Name]
		state := "up"
		if h.Cordoned {
			state = "cordoned"
		}
		out = append(out, api.Host{Name: h.Name, State: state, CPUs: h.CPUs, MemoryMiB: h.MemoryMiB,
			CPUOvercommit: h.CPURatio, MemoryOvercommit: h.MemRatio, ReserveCPUs: h.ReserveCPUs, ReserveMemoryMiB: h.ReserveMemoryMiB,
			CPUsOffered: h.AllowedCPUs(), MemoryOfferedMiB: h.AllowedMemoryMiB(), CPUsUsed: u.CPUs, MemoryUsedMiB: u.MemoryMiB})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) cordonHost(c bool) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		if s.Capacity == nil {
			return errdefs.New(errdefs.ErrMissingDependency, "this server keeps no capacity ledger")
		}
		if err := s.Capacity.SetCordoned(r.PathValue("host"), c); err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, api.OK{OK: true})
		return nil
	}
}
