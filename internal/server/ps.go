package server

import "net/http"

// machinePs answers GET …/machines/{id}/ps: the processes in a started machine's guest,
// in Fly's shape. Fly's sort_by and order are ignored: the list is in PID order.
func (s *Server) machinePs(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	procs, err := s.Node.Ps(r.Context(), m.ID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, procs)
	return nil
}
