package machines

import (
	"bytes"
	"context"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
	"github.com/kilnhq/kiln/internal/supervisor"
)

// ExecOutputCap bounds each stream of a buffered exec (stdout, stderr) that the host
// holds in memory; the rest is read from the guest and dropped, and the answer says
// truncated. A streaming exec has no cap: its output is never held, only passed on.
const ExecOutputCap = 1 << 20

// MaxExecTimeout is the longest timeout an exec may ask for, and the timeout of one that
// asks for none (0): no exec holds the guest and the server for ever, even one whose
// client stopped reading and left. A request above it is refused rather than clamped, so
// a caller never believes it has more time than it has.
const MaxExecTimeout = time.Hour

// StartExec starts a command in a started machine, as its workload's user, with its
// environment and working directory, wired to pio. The caller waits for it.
func (s *Service) StartExec(ctx context.Context, id string, req guest.ExecRequest, pio guest.IO) (*guest.Process, error) {
	if t := time.Duration(req.TimeoutMS) * time.Millisecond; t > MaxExecTimeout || t < 0 {
		return nil, errdefs.Invalid("exec timeout %s: want up to the limit exec.timeout_max (%s); 0 means that limit", t, MaxExecTimeout)
	}
	if req.TimeoutMS == 0 {
		req.TimeoutMS = MaxExecTimeout.Milliseconds()
	}
	vm, err := s.running(id)
	if err != nil {
		return nil, err
	}
	as := vm.As()
	req.Env = append(append([]string{}, as.Env...), req.Env...)
	req.UID, req.GID = as.UID, as.GID
	if req.Dir == "" {
		req.Dir = as.Dir
	}
	// The program only: arguments may hold secrets, and the line says who ran what.
	s.log(ctx).Info("exec", "machine", id, "program", execProgram(req.Argv))
	return vm.Exec(ctx, req, pio)
}

// running returns the VM of a machine whose workload runs now, for a call into its guest.
func (s *Service) running(id string) (supervisor.VM, error) {
	if vm := s.sup.Running(id); vm != nil {
		return vm, nil
	}
	return nil, errdefs.New(errdefs.ErrConflict, "machine %s is not running: start it first", id)
}

// Exec runs a command in a started machine and returns its output, at most
// ExecOutputCap bytes of each stream.
func (s *Service) Exec(ctx context.Context, id string, req guest.ExecRequest, stdin []byte) (api.ExecResponse, error) {
	out := &guest.LimitedBuffer{Max: ExecOutputCap}
	errb := &guest.LimitedBuffer{Max: ExecOutputCap}
	pio := guest.IO{Stdout: out, Stderr: errb}
	if stdin != nil {
		pio.Stdin = bytes.NewReader(stdin)
	}
	p, err := s.StartExec(ctx, id, req, pio)
	if err != nil {
		return api.ExecResponse{}, err
	}
	st, err := p.Wait(ctx)
	if err != nil {
		return api.ExecResponse{}, err
	}
	return api.ExecResponse{ExitCode: st.Code, ExitSignal: st.Signal, Stdout: out.String(), Stderr: errb.String(),
		Truncated: out.Truncated || errb.Truncated}, nil
}

// execProgram names what an exec runs, for a log line: its argv[0], cut short.
func execProgram(argv []string) string {
	if len(argv) == 0 {
		return ""
	}
	p := argv[0]
	if len(p) > 128 {
		p = p[:128]
	}
	return p
}
