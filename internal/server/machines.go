package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machinelog"
	"github.com/kilnhq/kiln/internal/store"
)

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
