package server

import (
	"encoding/json"
	"net/http"

	"github.com/kilnhq/kiln/internal/auditlog"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

// need is what a route asks of the caller's token.
type need struct {
	// on is what the route acts on: "app" or "project" (named by the path), "operator"
	// (the whole installation), "" for any valid token (the handler narrows what it
	// shows), or "public" (no token).
	on   string
	role auth.Role
}

var (
	public        = need{on: "public"}
	anyone        = need{}
	appRead       = need{"app", auth.Read}
	appExec       = need{"app", auth.Exec}
	appDeploy     = need{"app", auth.Deploy}
	appAdmin      = need{"app", auth.Admin}
	projectRead   = need{"project", auth.Read}
	projectDeploy = need{"project", auth.Deploy}
	operator      = need{"operator", auth.Admin}
)

// check says whether id may make the call. A token that does not reach the app or
// project gets 404, as if it did not exist, so that names do not leak across tenants; a
// token that reaches it with too weak a role gets 403.
func (n need) check(id auth.Identity, r *http.Request) error {
	switch n.on {
	case "app":
		return mayOn(id, auth.App(r.PathValue("app")), n.role)
	case "project":
		return mayOn(id, auth.Project(r.PathValue("project")), n.role)
	case "operator":
		if !id.Operator() {
			return errdefs.New(errdefs.ErrForbidden, "token %s (%s) cannot do this: it needs the operator's token (DATA_DIR/admin-token)", id.TokenID, id.Describe())
		}
	}
	return nil
}

// mayOn checks id's reach and role on a resource.
func mayOn(id auth.Identity, res auth.Resource, role auth.Role) error {
	if !id.Reaches(res) {
		if res.Kind == "project" {
			return errdefs.New(errdefs.ErrNotFound, "project %s not found", res.Name)
		}
		return errdefs.New(errdefs.ErrNotFound, "app %s not found: list apps with `kiln app ls`", res.Name)
	}
	if id.Role < role {
		return errdefs.New(errdefs.ErrForbidden, "token %s has role %s on %s: this call needs %s (ask for a token with --role %s)", id.TokenID, id.Role, res, role, role)
	}
	return nil
}

// identityHeader carries the caller's identity on a call one host forwards to another
// over the cluster's TLS link; the caller's token stays on the first host.
const identityHeader = "Kiln-Identity"

// identify finds who is calling: from the token, or, on a call another host of the
// cluster forwarded over its authenticated link, from the identity it carries.
func (s *Server) identify(r *http.Request) (auth.Identity, error) {
	if Peer(r) {
		var id auth.Identity
		h := r.Header.Get(identityHeader)
		if h == "" {
			return auth.Identity{TokenID: "host:" + peerName(r), Role: auth.Admin}, nil
		}
		if err := json.Unmarshal([]byte(h), &id); err != nil {
			return auth.Identity{}, errdefs.Wrap(errdefs.ErrInvalid, err, "forwarded identity")
		}
		return id, nil
	}
	r.Header.Del(identityHeader) // only a peer may say who the caller is
	if s.Auth == nil {
		return auth.Identity{}, errdefs.New(errdefs.ErrUnauthenticated, "this server checks no tokens")
	}
	return s.Auth.Check(r.Context(), auth.FromRequest(r))
}

// Peer says whether the request came from another host of the cluster: over TLS, with a
// client certificate the cluster's CA signed (the listener verified it).
func Peer(r *http.Request) bool {
	return r.TLS != nil && len(r.TLS.VerifiedChains) > 0
}

func peerName(r *http.Request) string {
	if Peer(r) {
		return r.TLS.VerifiedChains[0][0].Subject.CommonName
	}
	return ""
}

// recorder remembers what the audit entry needs of a call: its status, who called,
// and whether the scope check refused it.
type recorder struct {
	auditlog.Recorder
	id      auth.Identity
	refused bool
}

// audit records a call that changed something or was refused. A call another host
// forwarded here was recorded there.
func (s *Server) audit(r *http.Request, route Route, rec *recorder) {
	if s.Access == nil || Peer(r) {
		return
	}
	status := rec.Status()
	// A 404 about a named thing is a refusal too: it is also what a probe for another
	// tenant's machine or build gets.
	refused := rec.refused || status == http.StatusUnauthorized || status == http.StatusForbidden ||
		status == http.StatusNotFound && r.PathValue("id") != ""
	if !refused && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
		return
	}
	target := ""
	for _, k := range []string{"id", "key", "host", "token", "name", "version"} {
		if v := r.PathValue(k); v != "" {
			target = v
			break
		}
	}
	if target == "" {
		target = r.PathValue("project")
	}
	auditlog.Record(s.Access, r, store.AuditEntry{TokenID: rec.id.TokenID, App: r.PathValue("app"),
		Action: route.Method + " " + route.Path, Target: target, Result: status}, s.logf(r.Context()))
}
