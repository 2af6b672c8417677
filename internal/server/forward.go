package server

import (
	"encoding/json"
	"net/http"
	"net/http/httputil"
	"net/url"

	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/reqid"
)

const forwardedHeader = "Kiln-Forwarded-By"

// forward sends a call about a machine that another host runs to that host, so the API
// can be called on any host. It reports whether it answered the request.
func (s *Server) forward(w http.ResponseWriter, r *http.Request) bool {
	if s.Cluster == nil {
		return false
	}
	m, err := s.Store.GetMachine(r.Context(), r.PathValue("id"))
	if err != nil || s.Cluster.Mine(m) || m.App != r.PathValue("app") {
		// The handler answers: 404 (as for an unknown ID when the machine is another
		// app's, so that nothing about it, not even its host, is told), or the call.
		return false
	}
	if !Peer(r) {
		r.Header.Del(forwardedHeader) // only a host says it forwarded a call
	}
	if by := r.Header.Get(forwardedHeader); by != "" {
		writeError(w, errdefs.New(errdefs.ErrUnavailable, "machine %s runs on host %s, and %s forwarded this call here: the hosts disagree about where it runs", m.ID, m.Host, by))
		return true
	}
	s.forwardTo(w, r, m.Host, "machine "+m.ID)
	return true
}

// forwardTo sends the request to the named host's peer listener, over the cluster's
// mutual TLS (s.Peers); what names the thing asked about in errors. The caller's token
// stays here: the call carries the identity this host checked (Kiln-Identity), which
// the other host believes because the link is authenticated, and answers as if the
// caller had called it.
func (s *Server) forwardTo(w http.ResponseWriter, r *http.Request, host, what string) {
	owner, err := s.Cluster.Owner(r.Context(), host, what)
	if err != nil {
		writeError(w, err)
		return
	}
	if s.Peers == nil || owner.PeerURL == "" {
		writeError(w, errdefs.New(errdefs.ErrUnavailable, "%s is on host %s, which this host has no link to (hosts link over mutual TLS once both run this kiln version and share the cluster's secret)", what, host))
		return
	}
	target, err := url.Parse(owner.PeerURL)
	if err != nil {
		writeError(w, errdefs.Wrap(errdefs.ErrUnavailable, err, "host %s's peer address", host))
		return
	}
	id, _ := auth.From(r.Context()) // without one, nobody: the other host grants nothing
	who, err := json.Marshal(id)
	if err != nil {
		writeError(w, err)
		return
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			for _, h := range []string{"Authorization", "Proxy-Authorization", "Cookie"} {
				pr.Out.Header.Del(h)
			}
			pr.Out.Header.Set(identityHeader, string(who))
			pr.Out.Header.Set(forwardedHeader, s.Cluster.Name())
			// The other host's lines about this call carry this host's id for it.
			pr.Out.Header.Del(reqid.AltHeader)
			pr.Out.Header.Set(reqid.Header, reqid.From(r.Context()))
		},
		ModifyResponse: func(res *http.Response) error {
			res.Header.Del(reqid.Header) // the same id, which this host's answer already names
			return nil
		},
		Transport:     s.Peers,
		FlushInterval: -1, // logs and waits stream; an exec's upgrade passes through
		ErrorHandler: func(w http.ResponseWriter, _ *http.Request, err error) {
			writeError(w, errdefs.Wrap(errdefs.ErrUnavailable, err, "%s is on host %s (%s), which did not answer", what, host, owner.PeerURL))
		},
	}
	rp.ServeHTTP(w, r)
}
