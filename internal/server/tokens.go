package server

import (
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"slices"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

// maxScope bounds the apps and projects one token names.
const maxScope = 100

// createToken issues a token. Only the operator issues tokens, and never one with the
// operator's own reach (admin over everything): that one is DATA_DIR/admin-token.
func (s *Server) createToken(w http.ResponseWriter, r *http.Request) error {
	var req api.CreateTokenRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	role, err := auth.ParseRole(req.Role)
	if err != nil {
		return err
	}
	if len(req.Apps)+len(req.Projects) > maxScope {
		return errdefs.Invalid("a token names at most %d apps and projects", maxScope)
	}
	var scope []auth.Resource
	for _, a := range req.Apps {
		if !appNameOK(a) {
			return errdefs.Invalid("app %q: use lowercase letters, digits and dashes, up to 63", a)
		}
		scope = append(scope, auth.App(a))
	}
	for _, p := range req.Projects {
		if err := build.ValidProject(p); err != nil {
			return err
		}
		scope = append(scope, auth.Project(p))
	}
	if len(scope) == 0 && role == auth.Admin {
		return errdefs.Invalid("an admin token over every app is the operator's token (DATA_DIR/admin-token): name the apps (--app) or projects (--project) this one is for")
	}
	var expires time.Time
	if req.Expiry != "" && req.Expiry != "0" {
		d, err := time.ParseDuration(req.Expiry)
		if err != nil || d <= 0 {
			return errdefs.Invalid("expiry %q: give a duration like 720h, or 0 for none", req.Expiry)
		}
		expires = time.Now().Add(d).Truncate(time.Second)
	}
	caveats := []string{auth.RoleCaveat(role)}
	if len(scope) > 0 {
		caveats = append(caveats, auth.ScopeCaveat(scope...))
	}
	if !expires.IsZero() {
		caveats = append(caveats, auth.ExpiresCaveat(expires))
	}
	var b [8]byte
	rand.Read(b[:])
	tid := "tok_" + hex.EncodeToString(b[:])
	tok := s.Auth.Key.Mint(tid, caveats...)
	t, _ := auth.Parse(tok)
	granted, err := auth.IdentityOf(t, time.Now())
	if err != nil {
		return err
	}
	caller, _ := auth.From(r.Context())
	rec := store.Token{ID: tid, Hash: auth.Hash(tok), Description: granted.Describe(), CreatedBy: caller.TokenID,
		CreatedAt: time.Now(), ExpiresAt: expires}
	if err := s.Access.CreateToken(r.Context(), rec); err != nil {
		return err
	}
	out := tokenAPI(rec)
	out.Token = tok
	writeJSON(w, http.StatusCreated, out)
	return nil
}

func tokenAPI(t store.Token) api.Token {
	return api.Token{ID: t.ID, Description: t.Description, CreatedBy: t.CreatedBy, CreatedAt: t.CreatedAt,
		ExpiresAt: t.ExpiresAt, RevokedAt: t.RevokedAt}
}

func (s *Server) listTokens(w http.ResponseWriter, r *http.Request) error {
	ts, err := s.Access.ListTokens(r.Context())
	if err != nil {
		return err
	}
	out := []api.Token{}
	for _, t := range ts {
		out = append(out, tokenAPI(t))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) revokeToken(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("token")
	if id == auth.OperatorID {
		return errdefs.Invalid("the operator's token cannot be revoked on its own: replace the token key (see the README's Tokens section), which replaces it")
	}
	if err := s.Access.RevokeToken(r.Context(), id, time.Now()); err != nil {
		return err
	}
	s.Auth.Forget(id)
	t, err := s.Access.GetToken(r.Context(), id)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, tokenAPI(t))
	return nil
}

// currentToken says who the caller is.
func (s *Server) currentToken(w http.ResponseWriter, r *http.Request) error {
	id, _ := auth.From(r.Context())
	out := api.Identity{TokenID: id.TokenID, Role: id.Role.String(), Operator: id.Operator(), Limited: id.Limited, Expires: id.Expires}
	for _, res := range id.Scope {
		if res.Kind == "app" {
			out.Apps = append(out.Apps, res.Name)
		} else {
			out.Projects = append(out.Projects, res.Name)
		}
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// listAudit reads the audit log: all of it for the operator; a token with the admin role
// on some apps reads theirs.
func (s *Server) listAudit(w http.ResponseWriter, r *http.Request) error {
	id, _ := auth.From(r.Context())
	q := r.URL.Query()
	f := store.AuditFilter{App: q.Get("app")}
	if v := q.Get("since"); v != "" {
		if d, err := time.ParseDuration(v); err == nil {
			f.Since = time.Now().Add(-d)
		} else if t, err := time.Parse(time.RFC3339, v); err == nil {
			f.Since = t
		} else {
			return errdefs.Invalid("since=%q: give a duration (1h) or a time (2026-11-24T10:00:00Z)", v)
		}
	}
	if !id.Operator() {
		if id.Role < auth.Admin {
			return errdefs.New(errdefs.ErrForbidden, "token %s has role %s: reading the audit log needs admin", id.TokenID, id.Role)
		}
		f.Apps = []string{}
		for _, res := range id.Scope {
			if res.Kind == "app" {
				f.Apps = append(f.Apps, res.Name)
			}
		}
		if f.App != "" && !slices.Contains(f.Apps, f.App) {
			return errdefs.New(errdefs.ErrNotFound, "app %s not found: list apps with `kiln app ls`", f.App)
		}
	}
	es, err := s.Access.ListAudit(r.Context(), f)
	if err != nil {
		return err
	}
	out := []api.AuditEntry{}
	for _, e := range es {
		out = append(out, api.AuditEntry(e))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}
