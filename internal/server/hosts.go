package server

import (
	"net/http"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/cluster"
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
	var states []cluster.HostState
	if s.Cluster != nil {
		var err error
		if states, err = s.Cluster.States(r.Context()); err != nil {
			return err
		}
	} else {
		local, used := s.Capacity.Hosts()
		for _, h := range local {
			states = append(states, cluster.HostState{Host: h, State: "up", Used: used[h.Name]})
		}
	}
	out := []api.Host{}
	for _, h := range states {
		out = append(out, api.Host{Name: h.Name, State: h.State, CPUs: h.CPUs, MemoryMiB: h.MemoryMiB,
			CPUOvercommit: h.CPURatio, MemoryOvercommit: h.MemRatio, ReserveCPUs: h.ReserveCPUs, ReserveMemoryMiB: h.ReserveMemoryMiB,
			CPUsOffered: h.AllowedCPUs(), MemoryOfferedMiB: h.AllowedMemoryMiB(), CPUsUsed: h.Used.CPUs, MemoryUsedMiB: h.Used.MemoryMiB})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// cordonHost cordons or uncordons a host; another host applies it at its next heartbeat.
func (s *Server) cordonHost(c bool) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		if s.Capacity == nil {
			return errdefs.New(errdefs.ErrMissingDependency, "this server keeps no capacity ledger")
		}
		name := r.PathValue("host")
		var err error
		if s.Cluster != nil {
			err = s.Cluster.SetCordoned(r.Context(), name, c)
		} else {
			err = s.Capacity.SetCordoned(name, c)
		}
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, api.OK{OK: true})
		return nil
	}
}

// drainHost cordons a host and moves what it can of its machines elsewhere; the host
// itself does the work, so a call made elsewhere goes to it.
func (s *Server) drainHost(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("host")
	if s.Cluster == nil {
		return errdefs.New(errdefs.ErrNotFound, "no host %s: this server keeps no host registry", name)
	}
	if name != s.Cluster.Name() {
		if r.Header.Get(forwardedHeader) != "" {
			return errdefs.New(errdefs.ErrNotFound, "no host %s here", name)
		}
		s.forwardTo(w, r, name, "host "+name)
		return nil
	}
	rep, err := s.Cluster.Drain(r.Context(), s.Node)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, rep)
	return nil
}
