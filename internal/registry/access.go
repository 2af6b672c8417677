package registry

import (
	"encoding/json"
	"mime"
	"net/http"
	"slices"
	"strings"

	"github.com/kilnhq/kiln/internal/auditlog"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

// Namespaces: a repository localhost/NS/... belongs to the app or build project named
// NS, and only tokens reaching it push there or pull from it. Repositories with no
// namespace (localhost/NAME:TAG) and those under a namespace the operator shares
// (--registry-shared, localhost/library/... by default) are readable by every token and
// written by the operator alone.

// Rules are the registry's namespaces as the operator set them.
type Rules struct {
	// Shared lists namespaces every token may pull from.
	Shared []string
}

// namespace is a repository's first path segment, or "" for one with none.
func namespace(repo string) string {
	ns, _, ok := strings.Cut(repo, "/")
	if !ok {
		return ""
	}
	return ns
}

func (r Rules) shared(repo string) bool {
	ns := namespace(repo)
	return ns == "" || slices.Contains(r.Shared, ns)
}

func reachesNS(id auth.Identity, ns string, role auth.Role) bool {
	return id.May(auth.App(ns), role) || id.May(auth.Project(ns), role)
}

// MayPull says whether id may read the repository (a path in the registry, without
// "localhost/"); the error says what it may read instead.
func (r Rules) MayPull(id auth.Identity, repo string) error {
	if id.Operator() || r.shared(repo) && id.Role >= auth.Read || reachesNS(id, namespace(repo), auth.Read) {
		return nil
	}
	return errdefs.New(errdefs.ErrNotFound, "image localhost/%s not found: %s may use images under its own namespace (localhost/APP/... or localhost/PROJECT/...) and shared ones (%s)", repo, who(id), r.sharedWords())
}

// MayPush says whether id may write the repository.
func (r Rules) MayPush(id auth.Identity, repo string) error {
	if id.Operator() || !r.shared(repo) && reachesNS(id, namespace(repo), auth.Deploy) {
		return nil
	}
	if r.shared(repo) {
		return errdefs.New(errdefs.ErrForbidden, "localhost/%s is shared: only the operator's token pushes there; push under your own namespace (localhost/APP/NAME:TAG)", repo)
	}
	return errdefs.New(errdefs.ErrForbidden, "%s cannot push localhost/%s: push under a namespace it deploys to (localhost/APP/NAME:TAG or localhost/PROJECT/NAME:TAG)", who(id), repo)
}

func who(id auth.Identity) string {
	if id.TokenID == "" {
		return "this build"
	}
	return "token " + id.TokenID
}

func (r Rules) sharedWords() string {
	w := []string{"localhost/NAME:TAG"}
	for _, ns := range r.Shared {
		w = append(w, "localhost/"+ns+"/...")
	}
	return strings.Join(w, ", ")
}

// ProjectIdentity is what a build of the project may do in the registry: read its own
// and shared images, and write its own.
func ProjectIdentity(project string) auth.Identity {
	return auth.Identity{Role: auth.Deploy, Limited: true, Scope: []auth.Resource{auth.Project(project)}}
}

// Access is how the registry checks its callers.
type Access struct {
	Auth *auth.Checker
	Rules
	// Audit, if set, records pushes, deletions and refusals.
	Audit store.Audit
	Log   func(format string, args ...any)
}

// repoOf reads the repository a /v2/ path names. The route's own separator is the last
// one in the path (a reference, digest, upload ID or "list" has no slash), so a
// repository whose name holds "manifests" or "tags" is read whole, as the registry's
// router reads it. "/v2/" and "/v2/_catalog" name none.
func repoOf(r *http.Request) (repo string, ok bool) {
	p := strings.TrimPrefix(r.URL.Path, "/v2/")
	end := -1
	for _, sep := range []string{"/manifests/", "/blobs/", "/tags/", "/referrers/"} {
		end = max(end, strings.LastIndex(p, sep))
	}
	if end <= 0 {
		return "", false
	}
	return p[:end], true
}

// check decides a registry call; a nil error lets it through.
func (a Access) check(r *http.Request) (auth.Identity, error) {
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		// Another host of the cluster, over its authenticated link: it pulls images a
		// machine placed on it needs, and pushes nothing.
		id := auth.Identity{TokenID: "host:" + r.TLS.VerifiedChains[0][0].Subject.CommonName, Role: auth.Read}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			return id, errdefs.New(errdefs.ErrForbidden, "hosts pull from each other's registries and push nothing")
		}
		return id, nil
	}
	id, err := a.Auth.Check(r.Context(), auth.FromRequest(r))
	if err != nil {
		return id, err
	}
	path := strings.TrimPrefix(r.URL.Path, "/v2/")
	if path == "" {
		return id, nil // the version check: any valid token
	}
	repo, ok := repoOf(r)
	if !ok {
		if id.Operator() {
			return id, nil // _catalog and the like
		}
		return id, errdefs.New(errdefs.ErrForbidden, "%s: only the operator's token lists the registry", r.URL.Path)
	}
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return id, a.MayPull(id, repo)
	}
	// A cross-repository mount reads the other repository. The registry reads "from"
	// as a form value, from the query or a form body: check every one given.
	if r.Method == http.MethodPost {
		if ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); ct == "application/x-www-form-urlencoded" {
			// Only a form body is read here (a blob's body is the registry's to stream).
			r.Body = http.MaxBytesReader(nil, r.Body, 64<<10)
		}
		if err := r.ParseForm(); err != nil {
			return id, errdefs.Wrap(errdefs.ErrInvalid, err, "reading the request's form")
		}
		for _, from := range r.Form["from"] {
			if err := a.MayPull(id, from); err != nil {
				return id, err
			}
		}
	}
	return id, a.MayPush(id, repo)
}

// audit records a registry call that wrote a manifest, deleted, or was refused.
func (a Access) audit(r *http.Request, id auth.Identity, status int, refused bool) {
	// Manifests written or deleted, blobs completed or deleted (not upload chunks).
	writes := r.Method == http.MethodPut || r.Method == http.MethodDelete
	if a.Audit == nil || !refused && !writes {
		return
	}
	repo, _ := repoOf(r)
	auditlog.Record(a.Audit, r, store.AuditEntry{TokenID: id.TokenID, App: namespace(repo),
		Action: r.Method + " /v2/{repo}" + strings.TrimPrefix(r.URL.Path, "/v2/"+repo), Target: repo, Result: status}, a.Log)
}

// refuse answers a refused registry call in the distribution API's error shape.
func refuse(w http.ResponseWriter, err error) int {
	code, status := "DENIED", http.StatusForbidden
	switch {
	case errdefs.KindOf(err) == errdefs.ErrUnauthenticated:
		code, status = "UNAUTHORIZED", http.StatusUnauthorized
		w.Header().Set("WWW-Authenticate", `Basic realm="kiln"`)
	case errdefs.KindOf(err) == errdefs.ErrNotFound:
		code, status = "NAME_UNKNOWN", http.StatusNotFound
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{"code": code, "message": err.Error()}}})
	return status
}
