package server

import (
	"net/http"
	"net/http/httputil"
	"net/url"

	"github.com/kilnhq/kiln/internal/errdefs"
)

const forwardedHeader = "Kiln-Forwarded-By"

// forward sends a call about a machine that another host runs to that host, so the API
// can be called on any host. It reports whether it answered the request.
func (s *Server) forward(w http.ResponseWriter, r *http.Request) bool {
	if s.Cluster == nil {
		return false
	}
	m, err := s.Store.GetMachine(r.Context(), r.PathValue("id"))
	if err != nil || s.Cluster.Mine(m) {
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
	owner, err := s.Cluster.Owner(r.Context(), host, what)
	if err != nil {
		writeError(w, err)
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
	r.Header.Set(forwardedHeader, s.Cluster.Name())
	rp.ServeHTTP(w, r)
}
