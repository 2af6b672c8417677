package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machinelog"
	"github.com/kilnhq/kiln/internal/store"
)

// listMachines lists an app's machines with Fly's filters: state (a comma-separated
// list, or the parameter repeated), region, metadata.KEY=VALUE (each must match),
// include_deleted, and summary (no config or events).
func (s *Server) listMachines(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	states, err := statesParam(q["state"])
	if err != nil {
		return err
	}
	ms, err := s.Store.ListMachines(r.Context(), r.PathValue("app"))
	if err != nil {
		return err
	}
	mds, err := s.Store.AppMetadata(r.Context(), r.PathValue("app"))
	if err != nil {
		return err
	}
	out := []api.Machine{}
	for _, m := range ms {
		switch {
		case m.State == machine.Destroyed && q.Get("include_deleted") != "true",
			len(states) > 0 && !slices.Contains(states, m.State),
			q.Get("region") != "" && q.Get("region") != region:
			continue
		}
		md := mds[m.ID]
		if md == nil {
			md = map[string]string{}
		}
		if !metadataMatches(q, md) {
			continue
		}
		am := s.toAPI(m, md, nil)
		if q.Get("summary") == "true" {
			am.Config, am.ImageRef = nil, nil
		}
		out = append(out, am)
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// region is what kiln answers where Fly has a region: its hosts are one place.
const region = "local"

// statesParam reads state filters, repeated or comma-separated; "settled" stands for
// every state that is not on its way to another.
func statesParam(vals []string) ([]machine.State, error) {
	var out []machine.State
	for _, v := range vals {
		for _, w := range strings.Split(v, ",") {
			if w = strings.TrimSpace(w); w == "" {
				continue
			}
			if w == "settled" { // Fly's word for any state the machine rests in
				out = append(out, machine.Created, machine.Started, machine.Stopped, machine.Suspended, machine.Failed, machine.Destroyed)
				continue
			}
			st := machine.State(w)
			if !st.Valid() {
				return nil, errdefs.Invalid("state %q is not a machine state: use created, starting, started, stopping, stopped, suspending, suspended, destroyed, failed or settled", w)
			}
			out = append(out, st)
		}
	}
	return out, nil
}

func metadataMatches(q url.Values, md map[string]string) bool {
	for k, vs := range q {
		if key, ok := strings.CutPrefix(k, "metadata."); ok && (len(vs) == 0 || md[key] != vs[0]) {
			return false
		}
	}
	return true
}

// toAPI shows a machine in Fly's shape; md is its metadata (also shown as the config's)
// and evs its journal, oldest first, when the answer carries it.
func (s *Server) toAPI(m store.Machine, md map[string]string, evs []machine.Event) api.Machine {
	v := strconv.Itoa(m.Version)
	out := api.Machine{ID: m.ID, Name: m.Name, State: string(m.State), Region: region, Version: v, InstanceID: v,
		ExitCode: m.ExitCode, Cordoned: m.Cordoned, HostStatus: "ok", Host: m.Host, CreatedAt: m.CreatedAt, UpdatedAt: m.UpdatedAt}
	if m.State != machine.Destroyed && s.Node.Mine(m) {
		out.PrivateIP = s.Node.PrivateIP(m.ID)
	}
	cfg := machine.DecodeConfig(m.Config)
	if md != nil {
		cfg.Metadata = md
	}
	out.Config = &cfg
	out.ImageRef = imageRef(cfg.Image)
	for i := len(evs) - 1; i >= 0; i-- { // newest first, as Fly lists them
		e := evs[i]
		ae := api.Event{ID: fmt.Sprintf("%s-%d", m.ID, i+1), Type: e.Type, Status: string(e.Status), Source: e.Source,
			Timestamp: e.Timestamp.UnixMilli(), Message: e.Message}
		if e.ExitCode != nil {
			ae.Request = &api.EventRequest{ExitEvent: &api.ExitEvent{ExitCode: *e.ExitCode, GuestExitCode: *e.ExitCode, ExitedAt: e.Timestamp}}
		}
		out.Events = append(out.Events, ae)
	}
	return out
}

// imageRef splits an image reference as Fly shows it.
func imageRef(img string) *api.ImageRef {
	ref, err := name.ParseReference(img)
	if err != nil {
		return nil
	}
	out := &api.ImageRef{Registry: ref.Context().RegistryStr(), Repository: ref.Context().RepositoryStr()}
	switch r := ref.(type) {
	case name.Tag:
		out.Tag = r.TagStr()
	case name.Digest:
		out.Digest = r.DigestStr()
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

// leased lists the calls a lease guards, as Fly's do: those that change the machine's
// config or state. Reading it, exec, signals and metadata pass, as Fly's clients send
// them without a nonce.
var leased = regexp.MustCompile(`/machines/\{id\}(/(start|stop|restart|suspend|cordon|uncordon))?$`)

// machine loads the machine named in the path, which must belong to the path's app.
func (s *Server) machine(r *http.Request) (store.Machine, error) {
	m, err := s.Store.GetMachine(r.Context(), r.PathValue("id"))
	if err != nil {
		return m, err
	}
	if m.App != r.PathValue("app") {
		// Worded as the store words an unknown ID, so that another app's machine
		// cannot be told from none.
		return store.Machine{}, errdefs.New(errdefs.ErrNotFound, "machine %s does not exist", r.PathValue("id"))
	}
	// While a lease holds, only its holder changes the machine (taking the lease itself
	// is checked by the store).
	if r.Method != "GET" && leased.MatchString(r.Pattern) {
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
	if err := s.mayUseImage(r, req.Config.Image); err != nil {
		return err
	}
	m, nonce, err := s.Node.Create(r.Context(), app, req)
	if err != nil {
		return err
	}
	// The metadata as stored (a key sent with an empty value is none), as a read shows it.
	md, err := s.Store.Metadata(r.Context(), m.ID)
	if err != nil {
		return err
	}
	out := s.toAPI(m, md, nil)
	out.Nonce = nonce
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) getMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	md, err := s.Store.Metadata(r.Context(), m.ID)
	if err != nil {
		return err
	}
	evs, err := s.Store.Events(r.Context(), m.ID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, s.toAPI(m, md, evs))
	return nil
}

func (s *Server) startMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	if err := s.Node.Start(r.Context(), m.ID); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.StartResponse{PreviousState: string(m.State)})
	return nil
}

func (s *Server) stopMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	var req api.StopRequest
	if err := decodeOptional(r, &req); err != nil {
		return err
	}
	if req.ID != "" && req.ID != m.ID {
		return errdefs.Invalid("the body names machine %s, the path %s: send one machine's id", req.ID, m.ID)
	}
	sig, timeout, err := stopParams(req.Signal, string(req.Timeout))
	if err != nil {
		return err
	}
	if err := s.Node.StopWith(r.Context(), m.ID, sig, timeout); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}

// stopParams reads how a stop or restart asks the workload to end: a signal, and a
// timeout as a Go duration or whole seconds; none, or "0s" as Fly's client sends, means
// the config's stop_config.
func stopParams(signal, timeout string) (sig int, grace time.Duration, err error) {
	if signal != "" {
		if sig, err = machine.SignalNumber(signal); err != nil {
			return 0, 0, err
		}
	}
	if timeout != "" {
		if n, nerr := strconv.Atoi(timeout); nerr == nil {
			grace = time.Duration(n) * time.Second
		} else if grace, err = time.ParseDuration(timeout); err != nil {
			return 0, 0, errdefs.Invalid("timeout %q: want a duration like 10s", timeout)
		}
		if grace < 0 {
			return 0, 0, errdefs.Invalid("timeout %q: want a duration like 10s", timeout)
		}
	}
	return sig, grace, nil
}

func (s *Server) restartMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	q := r.URL.Query()
	sig, timeout, err := stopParams(q.Get("signal"), q.Get("timeout"))
	if err != nil {
		return err
	}
	if q.Get("force_stop") == "true" {
		sig = int(syscall.SIGKILL)
	}
	if err := s.Node.Restart(r.Context(), m.ID, sig, timeout); err != nil {
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
	q := r.URL.Query()
	states, err := statesParam(q["state"])
	if err != nil {
		return err
	}
	if len(states) == 0 {
		states = []machine.State{machine.Started}
	}
	version := 0
	for _, p := range []string{"version", "instance_id"} {
		if v := q.Get(p); v != "" {
			if version, err = strconv.Atoi(v); err != nil || version < 1 {
				return errdefs.New(errdefs.ErrNotFound, "machine %s has no %s %q: use the version the machine shows", m.ID, p, v)
			}
		}
	}
	timeout := 60 * time.Second
	if t := q.Get("timeout"); t != "" {
		n, err := strconv.Atoi(t)
		if err != nil || n < 1 || n > 300 {
			return errdefs.Invalid("timeout=%q: want whole seconds from 1 to 300", t)
		}
		timeout = time.Duration(n) * time.Second
	}
	// A wait that runs out is ErrTimeout (408) from WaitFor itself.
	got, err := s.Node.WaitFor(r.Context(), m.ID, states, version, timeout)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.WaitResponse{OK: true, State: string(got.State), Version: strconv.Itoa(got.Version)})
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
	if req.Container != "" {
		return errdefs.New(errdefs.ErrNotImplemented, "container %q: kiln machines run one workload, not Fly's containers: leave container out", req.Container)
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
	out := s.toAPI(m, nil, evs).Events
	if l := r.URL.Query().Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 {
			return errdefs.Invalid("limit=%q: want a whole number of events from 1", l)
		}
		out = out[:min(n, len(out))] // the newest n
	}
	if out == nil {
		out = []api.Event{}
	}
	writeJSON(w, http.StatusOK, out)
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

func (s *Server) updateMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	var req api.CreateMachineRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	if err := s.mayUseImage(r, req.Config.Image); err != nil {
		return err
	}
	updated, err := s.Node.Update(r.Context(), m.ID, req)
	if err != nil {
		return err
	}
	md, err := s.Store.Metadata(r.Context(), m.ID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, s.toAPI(updated, md, nil))
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
	sig, err := machine.SignalNumber(string(req.Signal))
	if err != nil {
		return err
	}
	if err := s.Node.Signal(r.Context(), m.ID, sig); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}
