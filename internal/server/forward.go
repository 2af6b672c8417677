package server

import (
	"net/http"
	"net/http/httputil"
	"net/url"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

// HostDownAfter is how long a host may go without a heartbeat before it counts as down.
const HostDownAfter = 10 * time.Second

const forwardedHeader = "Kiln-Forwarded-By"

// forward sends a call about a machine that another host runs to that host, so the API
// can be called on any host. It reports whether it answered the request.
func (s *Server) forward(w http.ResponseWriter, r *http.Request) bool {
	if s.Hosts == nil {
		return false
	}
	m, err := s.Store.GetMachine(r.Context(), r.PathValue("id"))
	if err != nil || s.Node.Mine(m) {
		return false // the handler answers (404, or the call itself)
	}
	if by := r.Header.Get(forwardedHeader); by != "" {
		writeError(w, errdefs.New(errdefs.ErrUnavailable, "machine %s runs on host %s, and %s forwarded this call here: the hosts disagree about where it runs", m.ID, m.Host, by))
		return true
	}
	s.forwardTo(w, r, m.Host, "machine "+m.ID)
	return true
}

// forwardTo sends the request to the named host's API; what names the thing asked about
// in errors.
func (s *Server) forwardTo(w http.ResponseWriter, r *http.Request, host, what string) {
	hosts, err := s.Hosts.ListHosts(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	var owner *store.Host
	for i := range hosts {
		if hosts[i].Name == host {
			owner = &hosts[i]
		}
	}
	if owner == nil {
		writeError(w, errdefs.New(errdefs.ErrUnavailable, "%s is on host %s, which is not registered", what, host))
		return
	}
	if time.Since(owner.HeartbeatAt) > HostDownAfter {
		writeError(w, errdefs.New(errdefs.ErrUnavailable, "%s runs on host %s, which is down (last heartbeat %s ago); kiln does not move machines by itself", what, host, time.Since(owner.HeartbeatAt).Round(time.Second)))
		return
	}
	target, err := url.Parse(owner.APIURL)
	if err != nil {
		writeError(w, err)
		return
	}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.FlushInterval = -1 // logs and waits stream
	rp.ErrorHandler = func(w http.ResponseWriter, _ *http.Request, err error) {
		writeError(w, errdefs.Wrap(errdefs.ErrUnavailable, err, "%s is on host %s (%s), which did not answer", what, host, owner.APIURL))
	}
	r.Header.Set(forwardedHeader, s.HostName)
	rp.ServeHTTP(w, r)
}

// hostLive says whether the named host has heartbeated recently.
func (s *Server) hostLive(r *http.Request, name string) bool {
	hosts, err := s.Hosts.ListHosts(r.Context())
	if err != nil {
		return false
	}
	for _, h := range hosts {
		if h.Name == name {
			return time.Since(h.HeartbeatAt) <= HostDownAfter
		}
	}
	return false
}
