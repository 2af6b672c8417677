package server

import (
	"net/http"
	"strconv"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

// leaseBody is a lease in Fly's envelope.
// The nonce is shown to the token that took the lease (and the operator) only: it is
// what lets a holder change the machine.
func leaseBody(r *http.Request, l store.Lease, m store.Machine) api.LeaseResponse {
	nonce := l.Nonce
	if id, _ := auth.From(r.Context()); !id.Operator() && id.TokenID != l.Owner {
		nonce = ""
	}
	return api.LeaseResponse{Status: "success", Data: &api.Lease{Nonce: nonce, ExpiresAt: l.ExpiresAt.Unix(),
		Owner: l.Owner, Description: l.Description, Version: strconv.Itoa(m.Version)}}
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
	writeJSON(w, http.StatusOK, leaseBody(r, l, m))
	return nil
}

// takeLease takes the machine's lease, or renews it when the request carries its nonce.
// The ttl is in seconds, in the body or (as Fly's client sends it) the query.
func (s *Server) takeLease(w http.ResponseWriter, r *http.Request) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	var req api.LeaseRequest
	if err := decodeOptional(r, &req); err != nil {
		return err
	}
	if q := r.URL.Query().Get("ttl"); q != "" {
		if req.TTL, err = strconv.Atoi(q); err != nil {
			return errdefs.Invalid("ttl=%q: want whole seconds", q)
		}
	}
	l, err := s.Node.TakeLease(r.Context(), m.ID, r.Header.Get(api.LeaseHeader), time.Duration(req.TTL)*time.Second, req.Description)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, leaseBody(r, l, m))
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
	writeJSON(w, http.StatusOK, map[string]any{"status": "success", "data": api.OK{OK: true}})
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
	if key := r.PathValue("key"); key != "" {
		v, ok := md[key]
		if !ok {
			return errdefs.New(errdefs.ErrNotFound, "machine %s has no metadata %q", m.ID, key)
		}
		writeJSON(w, http.StatusOK, api.MetadataValue{Value: v})
		return nil
	}
	writeJSON(w, http.StatusOK, md)
	return nil
}

func (s *Server) setMetadata(w http.ResponseWriter, r *http.Request) error {
	var req api.MetadataValue
	if err := decode(r, &req); err != nil {
		return err
	}
	if req.Value == "" {
		return errdefs.Invalid("metadata %q needs a value: delete a key with DELETE", r.PathValue("key"))
	}
	return s.updateMetadata(w, r, 0, map[string]string{r.PathValue("key"): req.Value})
}

func (s *Server) deleteMetadata(w http.ResponseWriter, r *http.Request) error {
	return s.updateMetadata(w, r, 0, map[string]string{r.PathValue("key"): ""})
}

// bulkMetadata is PUT or PATCH .../metadata: several keys set or (null or "") removed at
// once, optionally only while the machine is at machine_version.
func (s *Server) bulkMetadata(w http.ResponseWriter, r *http.Request) error {
	var req api.MetadataUpdate
	if err := decode(r, &req); err != nil {
		return err
	}
	// Each key is a statement in the store's transaction: no more than a machine can
	// hold, removed and set anew.
	if len(req.Metadata) > 2*machine.MaxMetadataKeys {
		return errdefs.Invalid("metadata: %d keys in one update, over the limit of %d", len(req.Metadata), 2*machine.MaxMetadataKeys)
	}
	kv := make(map[string]string, len(req.Metadata))
	for k, v := range req.Metadata {
		kv[k] = ""
		if v != nil {
			kv[k] = *v
		}
	}
	version := 0
	if req.MachineVersion != "" {
		var err error
		if version, err = strconv.Atoi(req.MachineVersion); err != nil || version < 1 {
			return errdefs.Invalid("machine_version %q: use the version the machine shows", req.MachineVersion)
		}
	}
	return s.updateMetadata(w, r, version, kv)
}

func (s *Server) updateMetadata(w http.ResponseWriter, r *http.Request, version int, kv map[string]string) error {
	m, err := s.machine(r)
	if err != nil {
		return err
	}
	md, err := s.Store.Metadata(r.Context(), m.ID)
	if err != nil {
		return err
	}
	for k, v := range kv {
		if v != "" {
			md[k] = v
		} else {
			delete(md, k)
		}
	}
	if err := machine.CheckMetadata(md); err != nil {
		return err
	}
	if err := s.Store.UpdateMetadata(r.Context(), m.ID, version, kv); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
