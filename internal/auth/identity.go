package auth

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Role is how much a token may do within its scope; each role includes those below it.
type Role int

// The roles, weakest first.
const (
	// Read sees machines, volumes, logs, events and builds, and changes nothing.
	Read Role = iota + 1
	// Exec also runs commands in machines.
	Exec
	// Deploy also creates, changes, starts, stops and destroys machines and volumes,
	// pushes images and runs builds.
	Deploy
	// Admin also deletes apps. With no scope, it is the operator: hosts, tokens and the
	// audit log.
	Admin
)

var roleNames = []string{"", "read", "exec", "deploy", "admin"}

func (r Role) String() string {
	if r < Read || r > Admin {
		return "none"
	}
	return roleNames[r]
}

// ParseRole reads a role's name.
func ParseRole(s string) (Role, error) {
	if i := slices.Index(roleNames, s); i > 0 {
		return Role(i), nil
	}
	return 0, errdefs.Invalid("role %q: use read, exec, deploy or admin", s)
}

// Resource is what a scope can name: an app or a build project.
type Resource struct {
	Kind string // "app" or "project"
	Name string
}

func (r Resource) String() string { return r.Kind + ":" + r.Name }

// App and Project name resources.
func App(name string) Resource     { return Resource{"app", name} }
func Project(name string) Resource { return Resource{"project", name} }

// Identity is who a checked token says the caller is.
type Identity struct {
	// TokenID names the token (its record in `kiln tokens ls`); "admin" is the
	// operator's token.
	TokenID string `json:"token_id"`
	Role    Role   `json:"role"`
	// Scope lists the resources the token reaches; nil means all of them.
	Scope []Resource `json:"scope,omitempty"`
	// Limited is set when Scope applies (an empty Scope then reaches nothing).
	Limited bool      `json:"limited,omitempty"`
	Expires time.Time `json:"expires,omitzero"`
}

// Operator says whether the identity is the operator's: admin over everything.
func (id Identity) Operator() bool { return id.Role == Admin && !id.Limited }

// Reaches says whether the resource is in the identity's scope, whatever its role.
func (id Identity) Reaches(r Resource) bool {
	return !id.Limited || slices.Contains(id.Scope, r)
}

// May says whether the identity may act on the resource with the role.
func (id Identity) May(r Resource, role Role) bool {
	return id.Reaches(r) && id.Role >= role
}

// Caveat keys.
const (
	caveatRole    = "role"
	caveatScope   = "scope"
	caveatExpires = "expires"
)

// RoleCaveat, ScopeCaveat and ExpiresCaveat make caveats.
func RoleCaveat(r Role) string { return caveatRole + "=" + r.String() }

// ScopeCaveat limits a token to the resources named.
func ScopeCaveat(rs ...Resource) string {
	names := make([]string, len(rs))
	for i, r := range rs {
		names[i] = r.String()
	}
	return caveatScope + "=" + strings.Join(names, ",")
}

// ExpiresCaveat ends a token at t.
func ExpiresCaveat(t time.Time) string {
	return caveatExpires + "=" + strconv.FormatInt(t.Unix(), 10)
}

// IdentityOf reads the identity a verified token grants at now: every caveat holds at
// once, so scopes intersect, the weakest role wins and the earliest expiry ends it. A
// caveat kiln does not know makes the token unusable rather than ignored.
func IdentityOf(t Token, now time.Time) (Identity, error) {
	id := Identity{TokenID: t.ID, Role: Admin}
	for _, c := range t.Caveats {
		k, v, _ := strings.Cut(c, "=")
		switch k {
		case caveatRole:
			r, err := ParseRole(v)
			if err != nil {
				return Identity{}, errdefs.Invalid("token %s: caveat %q: unknown role", t.ID, c)
			}
			id.Role = min(id.Role, r)
		case caveatScope:
			var rs []Resource
			for _, s := range strings.Split(v, ",") {
				kind, name, ok := strings.Cut(s, ":")
				if !ok || (kind != "app" && kind != "project") || name == "" {
					return Identity{}, errdefs.Invalid("token %s: caveat %q: a scope lists app:NAME and project:NAME", t.ID, c)
				}
				rs = append(rs, Resource{kind, name})
			}
			if id.Limited {
				rs = slices.DeleteFunc(rs, func(r Resource) bool { return !slices.Contains(id.Scope, r) })
			}
			id.Scope, id.Limited = rs, true
		case caveatExpires:
			sec, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return Identity{}, errdefs.Invalid("token %s: caveat %q: not a time", t.ID, c)
			}
			if e := time.Unix(sec, 0); id.Expires.IsZero() || e.Before(id.Expires) {
				id.Expires = e
			}
		default:
			return Identity{}, errdefs.Invalid("token %s: unknown caveat %q: this kiln cannot check it, so the token is refused", t.ID, c)
		}
	}
	if !id.Expires.IsZero() && !now.Before(id.Expires) {
		return Identity{}, errdefs.New(errdefs.ErrInvalid, "token %s expired at %s: ask for a new one", t.ID, id.Expires.UTC().Format(time.RFC3339))
	}
	return id, nil
}

// Describe words a token's reach for `kiln tokens ls` and the audit log.
func (id Identity) Describe() string {
	scope := "everything"
	if id.Limited {
		names := make([]string, len(id.Scope))
		for i, r := range id.Scope {
			names[i] = r.String()
		}
		scope = strings.Join(names, ",")
		if scope == "" {
			scope = "nothing"
		}
	}
	s := fmt.Sprintf("%s on %s", id.Role, scope)
	if !id.Expires.IsZero() {
		s += ", until " + id.Expires.UTC().Format(time.RFC3339)
	}
	return s
}

type ctxKey struct{}

// With returns ctx carrying the identity.
func With(ctx context.Context, id Identity) context.Context {
	return context.WithValue(ctx, ctxKey{}, id)
}

// From returns the identity ctx carries; without one it is nobody (no role, no scope).
func From(ctx context.Context) (Identity, bool) {
	id, ok := ctx.Value(ctxKey{}).(Identity)
	if !ok {
		return Identity{Limited: true}, false
	}
	return id, true
}
