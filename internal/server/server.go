// Package server is kiln's HTTP API: the Fly-Machines-shaped routes under /v1, bearer
// token authentication, and the one place where error kinds become status codes.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auditlog"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/cluster"
	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/deploy"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/limits"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/registry"
	"github.com/kilnhq/kiln/internal/reqid"
	"github.com/kilnhq/kiln/internal/secrets"
	"github.com/kilnhq/kiln/internal/serverlog"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/ui"
)

// Server serves the API.
type Server struct {
	Store  store.Store
	Node   *machines.Service
	Images interface {
		// LoadAs loads the tarball at path, if allow lets every repository it names;
		// errors call it name.
		LoadAs(ctx context.Context, path, name string, allow func(repo string) error, extra ...string) (string, []string, error)
		// LocalRepo says whether ref names an image of the built-in registry, and its
		// repository.
		LocalRepo(ref string) (string, bool)
	}
	// Cluster, when set, knows the hosts sharing the database (a single host included):
	// calls about a machine or build another host runs go to that host, GET /v1/hosts
	// lists them all, and it cordons and drains hosts.
	Cluster *cluster.Cluster
	// Peers carries calls forwarded to other hosts: over the cluster's mutual TLS
	// (clusterauth.Link.Transport), to their peer listeners.
	Peers http.RoundTripper
	// Capacity is this server's capacity ledger, shown by GET /v1/hosts.
	Capacity *capacity.Ledger
	// Limits lists every limit the server enforces, for GET /v1/limits.
	Limits *limits.Registry
	// Builds, if set, runs builds; without it the build routes say how to enable them.
	Builds *build.Service
	// Registry, if set, serves the built-in OCI registry at /v2/.
	Registry http.Handler
	// Auth checks tokens; Access keeps issued tokens and the audit log.
	Auth   *auth.Checker
	Access interface {
		store.Tokens
		store.Audit
	}
	// ImageRules say which registry images a token may use and push.
	ImageRules registry.Rules
	// Recovering, while set, makes the API answer 503: machines are being adopted and
	// must not change meanwhile. The registry is served regardless; recovery uses it.
	Recovering atomic.Bool
	// anonLines bounds the access lines of calls without a valid token: anyone can send
	// them as fast as the network allows, and the log must not fill the disk for them.
	anonLines auditlog.Budget
	// Log takes the server's lines: one per API call (its access line) and its own
	// complaints (an audit entry it could not write). Nil logs nothing.
	Log *slog.Logger
	// MaxImageBytes bounds an uploaded image tarball.
	MaxImageBytes int64
	// Metrics is what GET /metrics serves (metrics.NewRegistry with this server's
	// collectors); nil serves the process-wide instruments only.
	Metrics prometheus.Gatherer
	// Events is the journal GET /v1/events serves; nil answers that none is kept.
	Events store.EventLog
	// Deploys runs deploys and keeps releases; Secrets keeps apps' secrets. Without them
	// the deploy, release and secrets routes say deploys are off.
	Deploys *deploy.Engine
	Secrets *secrets.Apps
	// followers counts the open follows of GET /v1/events.
	followers followers
	// tenantMetrics is what the scrapes of tokens other than the operator's gather from.
	tenantMetrics tenantMetrics
}

// Route is one method and path pattern the server answers.
type Route struct {
	Method, Path string
	need         need
	h            func(http.ResponseWriter, *http.Request) error
}

// Routes lists every route; the OpenAPI test holds the document to it.
func (s *Server) Routes() []Route {
	return []Route{
		{"GET", "/v1/openapi.json", public, s.openapi},
		{"GET", "/v1/apps", anyone, s.listApps},
		{"POST", "/v1/apps", anyone, s.createApp},
		{"GET", "/v1/apps/{app}", appRead, s.getApp},
		{"DELETE", "/v1/apps/{app}", appAdmin, s.deleteApp},
		{"GET", "/v1/apps/{app}/machines", appRead, s.listMachines},
		{"POST", "/v1/apps/{app}/machines", appDeploy, s.createMachine},
		{"GET", "/v1/apps/{app}/machines/{id}", appRead, s.getMachine},
		{"DELETE", "/v1/apps/{app}/machines/{id}", appDeploy, s.machineOp(func(r *http.Request, m store.Machine) error {
			// Fly documents force; its client sends kill.
			q := r.URL.Query()
			return s.Node.Destroy(r.Context(), m.ID, q.Get("force") == "true" || q.Get("kill") == "true")
		})},
		{"POST", "/v1/apps/{app}/machines/{id}/start", appDeploy, s.startMachine},
		{"POST", "/v1/apps/{app}/machines/{id}/stop", appDeploy, s.stopMachine},
		{"POST", "/v1/apps/{app}/machines/{id}/restart", appDeploy, s.restartMachine},
		{"POST", "/v1/apps/{app}/machines/{id}/suspend", appDeploy, s.machineOp(func(r *http.Request, m store.Machine) error {
			return s.Node.Suspend(r.Context(), m.ID)
		})},
		{"GET", "/v1/apps/{app}/machines/{id}/wait", appRead, s.waitMachine},
		{"POST", "/v1/apps/{app}/machines/{id}/exec", appExec, s.execMachine},
		{"GET", "/v1/apps/{app}/machines/{id}/ps", appRead, s.machinePs},
		{"GET", "/v1/apps/{app}/machines/{id}/events", appRead, s.machineEvents},
		{"GET", "/v1/apps/{app}/machines/{id}/logs", appRead, s.machineLogs},
		{"POST", "/v1/apps/{app}/machines/{id}", appDeploy, s.updateMachine},
		{"POST", "/v1/apps/{app}/machines/{id}/signal", appDeploy, s.signalMachine},
		{"POST", "/v1/apps/{app}/machines/{id}/cordon", appDeploy, s.machineOp(func(r *http.Request, m store.Machine) error {
			return s.Store.SetCordoned(r.Context(), m.ID, true)
		})},
		{"POST", "/v1/apps/{app}/machines/{id}/uncordon", appDeploy, s.machineOp(func(r *http.Request, m store.Machine) error {
			return s.Store.SetCordoned(r.Context(), m.ID, false)
		})},
		{"GET", "/v1/apps/{app}/machines/{id}/lease", appRead, s.getLease},
		{"POST", "/v1/apps/{app}/machines/{id}/lease", appDeploy, s.takeLease},
		{"DELETE", "/v1/apps/{app}/machines/{id}/lease", appDeploy, s.releaseLease},
		{"GET", "/v1/apps/{app}/machines/{id}/metadata", appRead, s.getMetadata},
		{"PUT", "/v1/apps/{app}/machines/{id}/metadata", appDeploy, s.bulkMetadata},
		{"PATCH", "/v1/apps/{app}/machines/{id}/metadata", appDeploy, s.bulkMetadata},
		{"GET", "/v1/apps/{app}/machines/{id}/metadata/{key}", appRead, s.getMetadata},
		{"POST", "/v1/apps/{app}/machines/{id}/metadata/{key}", appDeploy, s.setMetadata},
		{"DELETE", "/v1/apps/{app}/machines/{id}/metadata/{key}", appDeploy, s.deleteMetadata},
		{"POST", "/v1/apps/{app}/plan", appDeploy, s.planDeploy},
		{"POST", "/v1/apps/{app}/deploys", appDeploy, s.createDeploy},
		{"POST", "/v1/apps/{app}/rollback", appDeploy, s.rollbackDeploy},
		{"POST", "/v1/apps/{app}/scale", appDeploy, s.scaleDeploy},
		{"GET", "/v1/apps/{app}/releases", appRead, s.listReleases},
		{"GET", "/v1/apps/{app}/releases/{version}", appRead, s.getRelease},
		{"GET", "/v1/apps/{app}/secrets", appRead, s.listSecrets},
		{"POST", "/v1/apps/{app}/secrets", appDeploy, s.setSecrets},
		{"POST", "/v1/apps/{app}/secrets/{name}", appDeploy, s.setSecret},
		{"DELETE", "/v1/apps/{app}/secrets/{name}", appDeploy, s.unsetSecret},
		{"GET", "/v1/apps/{app}/volumes", appRead, s.listVolumes},
		{"POST", "/v1/apps/{app}/volumes", appDeploy, s.createVolume},
		{"GET", "/v1/apps/{app}/volumes/{id}", appRead, s.getVolume},
		{"DELETE", "/v1/apps/{app}/volumes/{id}", appDeploy, s.deleteVolume},
		{"PUT", "/v1/apps/{app}/volumes/{id}", appDeploy, s.updateVolume},  // fly-go's flaps
		{"POST", "/v1/apps/{app}/volumes/{id}", appDeploy, s.updateVolume}, // Fly's documentation
		{"PUT", "/v1/apps/{app}/volumes/{id}/extend", appDeploy, s.extendVolume},
		{"GET", "/v1/apps/{app}/volumes/{id}/snapshots", appRead, s.listSnapshots},
		{"POST", "/v1/apps/{app}/volumes/{id}/snapshots", appDeploy, s.createSnapshot},
		{"POST", "/v1/images", anyone, s.loadImage},
		{"POST", "/v1/projects/{project}/builds", projectDeploy, s.submitBuild},
		{"GET", "/v1/projects/{project}/builds", projectRead, s.listBuilds},
		{"GET", "/v1/projects/{project}/builds/{id}", projectRead, s.getBuild},
		{"GET", "/v1/projects/{project}/builds/{id}/logs", projectRead, s.buildLogs},
		{"POST", "/v1/projects/{project}/builds/{id}/cancel", projectDeploy, s.cancelBuild},
		{"GET", "/v1/projects/{project}/cache", projectRead, s.buildCache},
		{"GET", "/v1/limits", anyone, s.listLimits},
		{"GET", "/v1/hosts", operator, s.listHosts},
		{"POST", "/v1/hosts/{host}/cordon", operator, s.cordonHost(true)},
		{"POST", "/v1/hosts/{host}/uncordon", operator, s.cordonHost(false)},
		{"POST", "/v1/hosts/{host}/drain", operator, s.drainHost},
		{"POST", "/v1/projects/{project}/cache/prune", projectDeploy, s.pruneBuildCache},
		{"DELETE", "/v1/projects/{project}/builder", projectDeploy, s.removeBuilder},
		{"POST", "/v1/tokens", operator, s.createToken},
		{"GET", "/v1/tokens", operator, s.listTokens},
		{"GET", "/v1/tokens/current", anyone, s.currentToken},
		{"DELETE", "/v1/tokens/{token}", operator, s.revokeToken},
		{"GET", "/v1/audit", anyone, s.listAudit},
		{"GET", "/v1/events", anyone, s.listEvents},
		{"GET", "/metrics", anyone, s.metrics},
	}
}

// Handler returns the API's HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	for _, r := range s.Routes() {
		mux.HandleFunc(r.Method+" "+r.Path, func(w http.ResponseWriter, req *http.Request) {
			rec := &recorder{Recorder: auditlog.Recorder{ResponseWriter: w}}
			defer s.logCall(req, r, rec, time.Now())
			if r.need == public {
				if err := r.h(rec, req); err != nil {
					writeError(rec, err)
				}
				return
			}
			defer s.audit(req, r, rec)
			id, err := s.identify(req)
			if err != nil {
				writeError(rec, err)
				return
			}
			rec.id = id
			req = req.WithContext(auth.With(req.Context(), id))
			// An authenticated client's connection is no longer shed by the cap on
			// unauthenticated ones (connlimit), however many half-open ones arrive.
			connlimit.Trust(req.Context())
			if s.Recovering.Load() {
				rec.Header().Set("Retry-After", "2")
				writeError(rec, errdefs.New(errdefs.ErrUnavailable, "kiln is starting and adopting its running machines: retry in a moment"))
				return
			}
			if app := req.PathValue("app"); machine.InternalApp(app) {
				// kiln's own machines (builders) are not the API's: their app does not
				// exist for callers, whatever the store holds.
				writeError(rec, errdefs.New(errdefs.ErrNotFound, "app %s not found: list apps with `kiln app ls`", app))
				return
			}
			if err := r.need.check(id, req); err != nil {
				rec.refused = true
				writeError(rec, err)
				return
			}
			if strings.Contains(r.Path, "/machines/{id}") && s.forward(rec, req) {
				return
			}
			if err := r.h(rec, req); err != nil {
				writeError(rec, err)
			}
		})
	}
	if s.Registry != nil {
		mux.Handle("/v2/", s.Registry)
	}
	mux.Handle("/ui/", ui.Handler()) // public static files; ServeMux redirects /ui to /ui/
	mux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		writeError(w, errdefs.New(errdefs.ErrNotFound, "no route %s %s: see /v1/openapi.json", req.Method, req.URL.Path))
	})
	// Every answer names its call's id, and whatever serves the call finds it in the
	// context: its log lines, a host it is forwarded to and the guest agent carry it.
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		id := reqid.Choose(req.Header.Values(reqid.Header), req.Header.Values(reqid.AltHeader))
		w.Header().Set(reqid.Header, id)
		mux.ServeHTTP(w, req.WithContext(reqid.With(req.Context(), id)))
	})
}

// logCall writes a call's access line once it is answered.
func (s *Server) logCall(r *http.Request, route Route, rec *recorder, start time.Time) {
	status := rec.Status()
	if rec.id.TokenID == "" {
		ok, dropped, sec := s.anonLines.Take(start)
		if dropped > 0 {
			serverlog.For(r.Context(), s.Log).Warn("access lines of calls without a valid token past the rate, not written one by one",
				"dropped", dropped, "second", sec, "limit_per_second", auditlog.DefaultAnonymousPerSecond)
		}
		if !ok {
			return
		}
	}
	level := slog.LevelInfo
	if status >= 500 {
		level = slog.LevelWarn
	}
	attrs := []slog.Attr{slog.String("method", r.Method), slog.String("route", route.Path), slog.Int("status", status),
		slog.Duration("duration", time.Since(start)), slog.String("token", rec.id.TokenID)}
	if by := r.Header.Get(forwardedHeader); by != "" && Peer(r) {
		attrs = append(attrs, slog.String("forwarded_by", by))
	}
	serverlog.For(r.Context(), s.Log).LogAttrs(r.Context(), level, "api call", attrs...)
}

// logf returns a printf-style logger whose lines carry the id of ctx's call.
func (s *Server) logf(ctx context.Context) func(string, ...any) {
	l := serverlog.For(ctx, s.Log)
	return func(format string, args ...any) { l.Info(fmt.Sprintf(format, args...)) }
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// writeError answers err with its kind's status from errdefs' one table, the table the
// client reads statuses back with, so a remote error has the kind a local one has.
func writeError(w http.ResponseWriter, err error) {
	writeJSON(w, errdefs.HTTPStatus(err), api.Error{Error: err.Error(), Status: errdefs.FlyStatus(err)})
}

// maxBody bounds a JSON request body: every request kiln takes is far smaller.
const maxBody = 1 << 20

// decode reads a JSON body strictly: one value, no unknown fields, at most maxBody bytes.
// The error names the field and the fix.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, maxBody))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		if _, err = dec.Token(); err == io.EOF {
			return nil
		} else if err == nil {
			err = errors.New("more than one JSON value")
		}
	}
	if tooBig := (*http.MaxBytesError)(nil); errors.As(err, &tooBig) {
		return errdefs.Invalid("request body is over %d KiB: send less", maxBody>>10)
	}
	return errdefs.Wrap(errdefs.ErrInvalid, err, "request body (check the fields against /v1/openapi.json)")
}

// decodeOptional decodes a body that may be absent, as Fly's clients send none for some
// calls that take one.
func decodeOptional(r *http.Request, v any) error {
	if r.ContentLength == 0 {
		return nil
	}
	return decode(r, v)
}

func (s *Server) openapi(w http.ResponseWriter, r *http.Request) error {
	w.Header().Set("Content-Type", "application/json")
	_, err := w.Write(api.OpenAPI)
	return err
}
