package server

import (
	"net/http"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

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
