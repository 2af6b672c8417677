package server

import (
	"net/http"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/capacity"
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
	local, used := s.Capacity.Hosts()
	var hosts []capacity.Host
	beats := map[string]time.Time{}
	if s.Hosts != nil {
		rows, err := s.Hosts.ListHosts(r.Context())
		if err != nil {
			return err
		}
		running, err := s.Node.UsageByHost(r.Context())
		if err != nil {
			return err
		}
		for _, h := range rows {
			hosts = append(hosts, capacity.Host{Name: h.Name, CPUs: h.CPUs, MemoryMiB: h.MemoryMiB, CPURatio: h.CPURatio, MemRatio: h.MemRatio,
				ReserveCPUs: h.ReserveCPUs, ReserveMemoryMiB: h.ReserveMemoryMiB, Cordoned: h.Cordoned})
			beats[h.Name] = h.HeartbeatAt
			if h.Name != s.HostName {
				used[h.Name] = running[h.Name]
			}
		}
	} else {
		hosts = local
	}
	out := []api.Host{}
	for _, h := range hosts {
		u := used[h.Name]
		state := "up"
		if h.Cordoned {
			state = "cordoned"
		}
		if t, ok := beats[h.Name]; ok && time.Since(t) > HostDownAfter {
			state = "down"
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
		name := r.PathValue("host")
		if s.Hosts != nil {
			if err := s.Hosts.SetHostCordoned(r.Context(), name, c); err != nil {
				return err
			}
			if name != s.HostName {
				writeJSON(w, http.StatusOK, api.OK{OK: true}) // that host applies it at its next heartbeat
				return nil
			}
		}
		if err := s.Capacity.SetCordoned(name, c); err != nil {
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
	if s.Hosts != nil && name != s.HostName {
		if r.Header.Get(forwardedHeader) != "" {
			return errdefs.New(errdefs.ErrNotFound, "no host %s here", name)
		}
		s.forwardTo(w, r, name, "host "+name)
		return nil
	}
	if s.Capacity == nil || (s.Hosts == nil && name != s.HostName) {
		return errdefs.New(errdefs.ErrNotFound, "no host %s: list them with `kiln host ls`", name)
	}
	if s.Hosts != nil {
		if err := s.Hosts.SetHostCordoned(r.Context(), name, true); err != nil {
			return err
		}
	}
	if err := s.Capacity.SetCordoned(name, true); err != nil {
		return err
	}
	rep, err := s.Node.Drain(r.Context(), s.Hosts)
	if err != nil {
		return err
	}
	rep.Host = name
	writeJSON(w, http.StatusOK, rep)
	return nil
}
