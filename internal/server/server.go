// Package server is kiln's HTTP API: the Fly-Machines-shaped routes under /v1, bearer
// token authentication, and the one place where error kinds become status codes.
package server

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/capacity"
	"github.com/kilnhq/kiln/internal/cluster"
	"github.com/kilnhq/kiln/internal/connlimit"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/limits"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machinelog"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/volume"
)

// Server serves the API.
type Server struct {
	Store  store.Store
	Node   *machines.Service
	Images interface {
		// LoadAs loads the tarball at path; errors call it name.
		LoadAs(ctx context.Context, path, name string, extra ...string) (string, []string, error)
	}
	// Cluster, when set, knows the hosts sharing the database (a single host included):
	// calls about a machine or build another host runs go to that host, GET /v1/hosts
	// lists them all, and it cordons and drains hosts.
	Cluster *cluster.Cluster
	// Capacity is this server's capacity ledger, shown by GET /v1/hosts.
	Capacity *capacity.Ledger
	// Limits lists every limit the server enforces, for GET /v1/limits.
	Limits *limits.Registry
	// Builds, if set, runs builds; without it the build routes say how to enable them.
	Builds *build.Service
	// Registry, if set, serves the built-in OCI registry at /v2/.
	Registry http.Handler
	Token    string
	// Recovering, while set, makes the API answer 503: machines are being adopted and
	// must not change meanwhile. The registry is served regardless; recovery uses it.
	Recovering atomic.Bool
	// MaxImageBytes bounds an uploaded image tarball.
	MaxImageBytes int64
}

// Route is one method and path pattern the server answers.
type Route struct {
	Method, Path string
	auth         bool
	h            func(http.ResponseWriter, *http.Request) error
}

// Routes lists every route; the OpenAPI test holds the document to it.
func (s *Server) Routes() []Route {
	return []Route{
		{"GET", "/v1/openapi.json", false, s.openapi},
		{"GET", "/v1/apps", true, s.listApps},
		{"POST", "/v1/apps", true, s.createApp},
		{"GET", "/v1/apps/{app}", true, s.getApp},
		{"GET", "/v1/apps/{app}/machines", true, s.listMachines},
		{"POST", "/v1/apps/{app}/machines", true, s.createMachine},
		{"GET", "/v1/apps/{app}/machines/{id}", true, s.getMachine},
		{"DELETE", "/v1/apps/{app}/machines/{id}", true, s.machineOp(func(r *http.Request, m store.Machine) error {
			return s.Node.Destroy(r.Context(), m.ID, r.URL.Query().Get("force") == "true")
		})},
		{"POST", "/v1/apps/{app}/machines/{id}/start", true, s.machineOp(func(r *http.Request, m store.Machine) error {
			return s.Node.Start(r.Context(), m.ID)
		})},
		{"POST", "/v1/apps/{app}/machines/{id}/stop", true, s.stopMachine},
		{"POST", "/v1/apps/{app}/machines/{id}/restart", true, s.restartMachine},
		{"POST", "/v1/apps/{app}/machines/{id}/suspend", true, s.machineOp(func(r *http.Request, m store.Machine) error {
			return s.Node.Suspend(r.Context(), m.ID)
		})},
		{"GET", "/v1/apps/{app}/machines/{id}/wait", true, s.waitMachine},
		{"POST", "/v1/apps/{app}/machines/{id}/exec", true, s.execMachine},
		{"GET", "/v1/apps/{app}/machines/{id}/events", true, s.machineEvents},
		{"GET", "/v1/apps/{app}/machines/{id}/logs", true, s.machineLogs},
		{"POST", "/v1/apps/{app}/machines/{id}", true, s.updateMachine},
		{"POST", "/v1/apps/{app}/machines/{id}/signal", true, s.signalMachine},
		{"POST", "/v1/apps/{app}/machines/{id}/cordon", true, s.machineOp(func(r *http.Request, m store.Machine) error {
			return s.Store.SetCordoned(r.Context(), m.ID, true)
		})},
		{"POST", "/v1/apps/{app}/machines/{id}/uncordon", true, s.machineOp(func(r *http.Request, m store.Machine) error {
			return s.Store.SetCordoned(r.Context(), m.ID, false)
		})},
		{"GET", "/v1/apps/{app}/machines/{id}/lease", true, s.getLease},
		{"POST", "/v1/apps/{app}/machines/{id}/lease", true, s.takeLease},
		{"DELETE", "/v1/apps/{app}/machines/{id}/lease", true, s.releaseLease},
		{"GET", "/v1/apps/{app}/machines/{id}/metadata", true, s.getMetadata},
		{"POST", "/v1/apps/{app}/machines/{id}/metadata/{key}", true, s.setMetadata},
		{"DELETE", "/v1/apps/{app}/machines/{id}/metadata/{key}", true, s.machineOp(func(r *http.Request, m store.Machine) error {
			return s.Store.SetMetadata(r.Context(), m.ID, r.PathValue("key"), "")
		})},
		{"GET", "/v1/apps/{app}/volumes", true, s.listVolumes},
		{"POST", "/v1/apps/{app}/volumes", true, s.createVolume},
		{"GET", "/v1/apps/{app}/volumes/{id}", true, s.getVolume},
		{"DELETE", "/v1/apps/{app}/volumes/{id}", true, s.deleteVolume},
		{"PUT", "/v1/apps/{app}/volumes/{id}/extend", true, s.extendVolume},
		{"GET", "/v1/apps/{app}/volumes/{id}/snapshots", true, s.listSnapshots},
		{"POST", "/v1/apps/{app}/volumes/{id}/snapshots", true, s.createSnapshot},
		{"POST", "/v1/images", true, s.loadImage},
		{"POST", "/v1/projects/{project}/builds", true, s.submitBuild},
		{"GET", "/v1/projects/{project}/builds", true, s.listBuilds},
		{"GET", "/v1/projects/{project}/builds/{id}", true, s.getBuild},
		{"GET", "/v1/projects/{project}/builds/{id}/logs", true, s.buildLogs},
		{"POST", "/v1/projects/{project}/builds/{id}/cancel", true, s.cancelBuild},
		{"GET", "/v1/projects/{project}/cache", true, s.buildCache},
		{"GET", "/v1/limits", true, s.listLimits},
		{"GET", "/v1/hosts", true, s.listHosts},
		{"POST", "/v1/hosts/{host}/cordon", true, s.cordonHost(true)},
		{"POST", "/v1/hosts/{host}/uncordon", true, s.cordonHost(false)},
		{"POST", "/v1/hosts/{host}/drain", true, s.drainHost},
		{"POST", "/v1/projects/{project}/cache/prune", true, s.pruneBuildCache},
		{"DELETE", "/v1/projects/{project}/builder", true, s.removeBuilder},
	}
}

// Handler returns the API's HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	for _, r := range s.Routes() {
		mux.HandleFunc(r.Method+" "+r.Path, func(w http.ResponseWriter, req *http.Request) {
			if r.auth && !s.authorized(req) {
				// The one status outside errdefs' table: a wrong token is the API's own
				// answer, not an error any operation below it returns, so it has no kind
				// (the client reads 401 back as unclassified).
				writeJSON(w, http.StatusUnauthorized, api.Error{Error: "missing or wrong bearer token: send Authorization: Bearer TOKEN (the admin token is in DATA_DIR/admin-token)"})
				return
			}
			if r.auth {
				// An authenticated client's connection is no longer shed by the cap on
				// unauthenticated ones (connlimit), however many half-open ones arrive.
				connlimit.Trust(req.Context())
			}
			if r.auth && s.Recovering.Load() {
				w.Header().Set("Retry-After", "2")
				writeError(w, errdefs.New(errdefs.ErrUnavailable, "kiln is starting and adopting its running machines: retry in a moment"))
				return
			}
			if app := req.PathValue("app"); machine.InternalApp(app) {
				// kiln's own machines (builders) are not the API's: their app does not
				// exist for callers, whatever the store holds.
				writeError(w, errdefs.New(errdefs.ErrNotFound, "app %s not found: list apps with `kiln app ls`", app))
				return
			}
			if strings.Contains(r.Path, "/machines/{id}") && s.forward(w, req) {
				return
			}
			if err := r.h(w, req); err != nil {
				writeError(w, err)
			}
		})
	}
	if s.Registry != nil {
		mux.Handle("/v2/", s.Registry)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		writeError(w, errdefs.New(errdefs.ErrNotFound, "no route %s %s: see /v1/openapi.json", req.Method, req.URL.Path))
	})
	return mux
}

func (s *Server) authorized(r *http.Request) bool {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return ok && s.Token != "" && subtle.ConstantTimeCompare([]byte(tok), []byte(s.Token)) == 1
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// writeError answers err with its kind's status from errdefs' one table, the table the
// client reads statuses back with, so a remote error has the kind a local one has.
func writeError(w http.ResponseWriter, err error) {
	writeJSON(w, errdefs.HTTPStatus(err), api.Error{Error: err.Error()})
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

func (s *Server) openapi(w http.ResponseWriter, r *http.Request) error {
	w.Header().Set("Content-Type", "application/json")
	_, err := w.Write(api.OpenAPI)
	return err
}

func (s *Server) listApps(w http.ResponseWriter, r *http.Request) error {
	names, err := s.Store.ListApps(r.Context())
	if err != nil {
		return err
	}
	apps := []api.App{}
	for _, n := range names {
		if machine.InternalApp(n) {
			continue
		}
		apps = append(apps, api.App{Name: n})
	}
	writeJSON(w, http.StatusOK, apps)
	return nil
}

func (s *Server) createApp(w http.ResponseWriter, r *http.Request) error {
	var req api.CreateAppRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	if !appNameOK(req.AppName) {
		return errdefs.Invalid("app_name %q: use lowercase letters, digits and dashes, up to 63", req.AppName)
	}
	if err := s.Store.CreateApp(r.Context(), req.AppName); err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, api.App{Name: req.AppName})
	return nil
}

func appNameOK(n string) bool {
	if n == "" || len(n) > 63 {
		return false
	}
	for i, c := range n {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' && i > 0) {
			return false
		}
	}
	return true
}

func (s *Server) getApp(w http.ResponseWriter, r *http.Request) error {
	app := r.PathValue("app")
	if _, err := s.Store.ListMachines(r.Context(), app); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.App{Name: app})
	return nil
}

func (s *Server) listMachines(w http.ResponseWriter, r *http.Request) error {
	ms, err := s.Store.ListMachines(r.Context(), r.PathValue("app"))
	if err != nil {
		return err
	}
	out := []api.Machine{}
	for _, m := range ms {
		if m.State == machine.Destroyed && r.URL.Query().Get("include_deleted") != "true" {
			continue
		}
		out = append(out, s.toAPI(m, nil))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) toAPI(m store.Machine, evs []machine.Event) api.Machine {
	out := api.Machine{ID: m.ID, Name: m.Name, State: string(m.State), Region: "local", InstanceID: fmt.Sprintf("%s-v%d", m.ID, m.Version),
		ExitCode: m.ExitCode, Version: m.Version, Cordoned: m.Cordoned, CreatedAt: m.CreatedAt, UpdatedAt: m.UpdatedAt}
	if m.State != machine.Destroyed && s.Node.Mine(m) {
		out.PrivateIP = s.Node.PrivateIP(m.ID)
	}
	out.Host = m.Host
	json.Unmarshal(m.Config, &out.Config)
	for i := len(evs) - 1; i >= 0; i-- { // newest first, as Fly lists them
		e := evs[i]
		ae := api.Event{Type: e.Type, Status: string(e.Status), Source: e.Source, Timestamp: e.Timestamp.UnixMilli(), Message: e.Message}
		if e.ExitCode != nil {
			ae.Request = &struct {
				ExitEvent *api.ExitEvent `json:"exit_event,omitempty"`
			}{&api.ExitEvent{ExitCode: *e.ExitCode}}
		}
		out.Events = append(out.Events, ae)
	}
	return out
}

// machineOp is a handler for calls that act on the path's machine and answer only
// whether they worked.
func (s *Server) machineOp(op func(*http.Request, store.Machine) error) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		m, err := s.machine(r)
		if err != nil {
			return err
		}
		if err := op(r, m); err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, api.OK{OK: true})
		return nil
	}
}

// machine loads the machine named in the path, which must belong to the path's app.
func (s *Server) machine(r *http.Request) (store.Machine, error) {
	m, err := s.Store.GetMachine(r.Context(), r.PathValue("id"))
	if err != nil {
		return m, err
	}
	if m.App != r.PathValue("app") {
		return m, errdefs.New(errdefs.ErrNotFound, "machine %s is not in app %s", m.ID, r.PathValue("app"))
	}
	// While a lease holds, only its holder changes the machine (taking the lease itself
	// is checked by the store).
	if r.Method != "GET" && !strings.HasSuffix(r.Pattern, "/lease") {
		if err := s.Node.CheckLease(r.Context(), m.ID, r.Header.Get(api.LeaseHeader)); err != nil {
			return m, err
		}
	}
	return m, nil
}

func (s *Server) createMachine(w http.ResponseWriter, r *http.Request) error {
	var req api.CreateMachineRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	app := r.PathValue("app")
	if _, err := s.Store.ListMachines(r.Context(), app); err != nil {
		return err
	}
	m, err := s.Node.Create(r.Context(), app, req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, s.toAPI(m, nil))
	return nil
}

func (s *Server) getMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	evs, err := s.Store.Events(r.Context(), m.ID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, s.toAPI(m, evs))
	return nil
}

func (s *Server) stopMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	var req api.StopRequest
	if r.ContentLength != 0 {
		if err := decode(r, &req); err != nil {
			return err
		}
	}
	sig := 0
	if req.Signal != "" {
		if sig, err = machine.SignalNumber(req.Signal); err != nil {
			return err
		}
	}
	var timeout time.Duration
	if req.Timeout != "" {
		if timeout, err = time.ParseDuration(req.Timeout); err != nil || timeout <= 0 {
			return errdefs.Invalid("timeout %q: want a duration like 10s", req.Timeout)
		}
	}
	if err := s.Node.StopWith(r.Context(), m.ID, sig, timeout); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}

func (s *Server) restartMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	if err := s.Node.Restart(r.Context(), m.ID); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}

func (s *Server) waitMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	state := machine.State(r.URL.Query().Get("state"))
	if state == "" {
		state = machine.Started
	}
	timeout := 60 * time.Second
	if t := r.URL.Query().Get("timeout"); t != "" {
		n, err := strconv.Atoi(t)
		if err != nil || n < 1 || n > 300 {
			return errdefs.Invalid("timeout=%q: want whole seconds from 1 to 300", t)
		}
		timeout = time.Duration(n) * time.Second
	}
	// A wait that runs out is ErrTimeout (408) from Wait itself.
	if err := s.Node.Wait(r.Context(), m.ID, state, timeout); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}

func (s *Server) execMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	var req api.ExecRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	argv := req.Command
	if len(argv) == 0 {
		argv = req.Cmd
	}
	if len(argv) == 0 {
		return errdefs.Invalid("command is required: the argv to run, e.g. [\"cat\", \"/etc/os-release\"]")
	}
	// machines.StartExec holds the timeout to exec.timeout_max; min keeps a huge one huge.
	gr := guest.ExecRequest{Argv: argv, TTY: req.TTY, Rows: req.Rows, Cols: req.Cols, TimeoutMS: int64(min(req.Timeout, 1<<31)) * 1000}
	if upgrading(r) {
		return s.execStream(w, r, m.ID, gr)
	}
	timeout := time.Duration(gr.TimeoutMS) * time.Millisecond
	if timeout == 0 {
		timeout = 60 * time.Second
		gr.TimeoutMS = timeout.Milliseconds()
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout+5*time.Second)
	defer cancel()
	var stdin []byte
	if req.Stdin != "" {
		stdin = []byte(req.Stdin)
	}
	res, err := s.Node.Exec(ctx, m.ID, gr, stdin)
	if err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			writeJSON(w, http.StatusOK, api.ExecResponse{ExitCode: 127, Stderr: err.Error() + "\n"})
			return nil
		}
		return err
	}
	writeJSON(w, http.StatusOK, res)
	return nil
}

func (s *Server) machineEvents(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	evs, err := s.Store.Events(r.Context(), m.ID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, s.toAPI(m, evs).Events)
	return nil
}

// machineLogs streams the stored output as NDJSON; with follow=true it keeps the
// response open and sends new lines as they come.
func (s *Server) machineLogs(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	follow := r.URL.Query().Get("follow") == "true"
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	enc := json.NewEncoder(w)
	return machinelog.Read(s.Node.LogDir(m.ID), follow, r.Context().Done(), func(l api.LogLine) error {
		if err := enc.Encode(l); err != nil {
			return err
		}
		if flusher != nil {
			flusher.Flush()
		}
		return nil
	})
}

// loadImage stores an uploaded `docker save` or OCI layout tarball; ?ref= adds a name.
func (s *Server) loadImage(w http.ResponseWriter, r *http.Request) error {
	max := s.MaxImageBytes
	if max == 0 {
		max = 8 << 30
	}
	f, err := os.CreateTemp("", "kiln-upload-*.tar")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	n, err := io.Copy(f, io.LimitReader(r.Body, max+1))
	if err != nil {
		return err
	}
	if n > max {
		return errdefs.Invalid("image tarball is larger than the %d bytes this server accepts", max)
	}
	var extra []string
	if ref := r.URL.Query().Get("ref"); ref != "" {
		extra = append(extra, ref)
	}
	// Errors say "the upload": the temporary file's path means nothing to the caller,
	// who names the file it sent (as the CLI does).
	digest, refs, err := s.Images.LoadAs(r.Context(), f.Name(), "the upload", extra...)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.ImageLoadResponse{Digest: digest, Refs: refs})
	return nil
}

func volumeAPI(v store.Volume) api.Volume {
	out := api.Volume{ID: v.ID, Name: v.Name, State: "created", SizeGB: int(v.SizeBytes >> 30), Region: "local",
		AttachedMachineID: v.AttachedMachine, CreatedAt: v.CreatedAt}
	if info, err := volume.Inspect(v.Path); err == nil {
		out.UsedBytes = info.Used
	}
	return out
}

func (s *Server) listVolumes(w http.ResponseWriter, r *http.Request) error {
	app := r.PathValue("app")
	if _, err := s.Store.ListMachines(r.Context(), app); err != nil {
		return err
	}
	vs, err := s.Store.ListVolumes(r.Context(), app)
	if err != nil {
		return err
	}
	out := []api.Volume{}
	for _, v := range vs {
		out = append(out, volumeAPI(v))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) createVolume(w http.ResponseWriter, r *http.Request) error {
	var req api.CreateVolumeRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	v, err := s.Node.CreateVolume(r.Context(), r.PathValue("app"), req.Name, req.SizeGB, req.SnapshotID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, volumeAPI(v))
	return nil
}

func (s *Server) getVolume(w http.ResponseWriter, r *http.Request) error {
	v, err := s.Store.GetVolume(r.Context(), r.PathValue("app"), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, volumeAPI(v))
	return nil
}

func (s *Server) deleteVolume(w http.ResponseWriter, r *http.Request) error {
	if err := s.Node.DeleteVolume(r.Context(), r.PathValue("app"), r.PathValue("id")); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}

func (s *Server) extendVolume(w http.ResponseWriter, r *http.Request) error {
	var req api.ExtendVolumeRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	v, restart, err := s.Node.ExtendVolume(r.Context(), r.PathValue("app"), r.PathValue("id"), req.SizeGB)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.ExtendVolumeResponse{Volume: volumeAPI(v), NeedsRestart: restart})
	return nil
}

func (s *Server) updateMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	var req api.CreateMachineRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	updated, err := s.Node.Update(r.Context(), m.ID, req.Config)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, s.toAPI(updated, nil))
	return nil
}

func (s *Server) signalMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	var req api.SignalRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	sig, err := machine.SignalNumber(req.Signal)
	if err != nil {
		return err
	}
	if err := s.Node.Signal(r.Context(), m.ID, sig); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}

func leaseAPI(l store.Lease) api.Lease {
	return api.Lease{Nonce: l.Nonce, ExpiresAt: l.ExpiresAt.Unix(), Description: l.Description}
}

func (s *Server) getLease(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	l, err := s.Node.Lease(r.Context(), m.ID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, leaseAPI(l))
	return nil
}

func (s *Server) takeLease(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	var req api.LeaseRequest
	if r.ContentLength != 0 {
		if err := decode(r, &req); err != nil {
			return err
		}
	}
	l, err := s.Node.TakeLease(r.Context(), m.ID, r.Header.Get(api.LeaseHeader), time.Duration(req.TTL)*time.Second, req.Description)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, leaseAPI(l))
	return nil
}

func (s *Server) releaseLease(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	if err := s.Node.ReleaseLease(r.Context(), m.ID, r.Header.Get(api.LeaseHeader)); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}

func (s *Server) getMetadata(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	md, err := s.Store.Metadata(r.Context(), m.ID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, md)
	return nil
}

func (s *Server) setMetadata(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	var req api.MetadataValue
	if err := decode(r, &req); err != nil {
		return err
	}
	key := r.PathValue("key")
	if key == "" || len(key) > 128 || req.Value == "" {
		return errdefs.Invalid("metadata needs a key of 1 to 128 characters and a non-empty value")
	}
	if err := s.Store.SetMetadata(r.Context(), m.ID, key, req.Value); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}

func snapshotAPI(sn store.Snapshot) api.Snapshot {
	return api.Snapshot{ID: sn.ID, VolumeID: sn.VolumeID, SizeBytes: sn.SizeBytes, CreatedAt: sn.CreatedAt}
}

func (s *Server) listSnapshots(w http.ResponseWriter, r *http.Request) error {
	v, err := s.Store.GetVolume(r.Context(), r.PathValue("app"), r.PathValue("id"))
	if err != nil {
		return err
	}
	sns, err := s.Store.Snapshots(r.Context(), v.ID)
	if err != nil {
		return err
	}
	out := []api.Snapshot{}
	for _, sn := range sns {
		out = append(out, snapshotAPI(sn))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) createSnapshot(w http.ResponseWriter, r *http.Request) error {
	sn, err := s.Node.SnapshotVolume(r.Context(), r.PathValue("app"), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, snapshotAPI(sn))
	return nil
}
