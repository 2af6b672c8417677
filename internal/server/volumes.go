package server

import (
	"net/http"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/volume"
)

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
