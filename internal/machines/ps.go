package machines

import (
	"context"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/guest"
)

// psTimeout bounds a process list: reading /proc of a few thousand processes takes the
// agent well under a second, and a guest that does not answer must not hold the caller.
const psTimeout = 30 * time.Second

// Ps lists the processes running in a started machine's guest, as its agent reads them
// from /proc: at most guest.MaxProcs, whatever the guest answers.
func (s *Service) Ps(ctx context.Context, id string) ([]api.ProcessStat, error) {
	vm, err := s.running(id)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, psTimeout)
	defer cancel()
	procs, err := vm.Ps(ctx)
	if err != nil {
		if ctx.Err() == context.DeadlineExceeded {
			return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "machine %s's guest did not list its processes within %s", id, psTimeout)
		}
		return nil, err
	}
	out := make([]api.ProcessStat, len(procs))
	for i, p := range procs {
		out[i] = processStat(p)
	}
	return out, nil
}

func processStat(p guest.ProcessStat) api.ProcessStat {
	sockets := make([]api.ListenSocket, len(p.Listen))
	for i, s := range p.Listen {
		sockets[i] = api.ListenSocket{Proto: s.Proto, Address: s.Address}
	}
	return api.ProcessStat{PID: p.PID, Stime: uint64(max(p.Start, 0)), Rtime: p.Run, Command: p.Command,
		Directory: p.Dir, CPU: p.CPUMS, RSS: p.RSS, ListenSockets: sockets}
}
