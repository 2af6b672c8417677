package server

import (
	"net/http"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/volume"
)

// volumeAPI is a volume in Fly's shape. One host is one region and zone; kiln does not
// encrypt volumes, and a volume that exists is created and on a healthy host.
func volumeAPI(v store.Volume) api.Volume {
	out := api.Volume{ID: v.ID, Name: v.Name, State: "created", SizeGB: int(v.SizeBytes >> 30), Region: "local", Zone: "local",
		FSType: "ext4", CreatedAt: v.CreatedAt, SnapshotRetention: v.SnapshotRetention, AutoBackupEnabled: v.AutoBackup, HostStatus: "ok"}
	if v.AttachedMachine != "" {
		out.AttachedMachineID = &v.AttachedMachine
	}
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

// volumeSpec reads a create request: the fields kiln honours, the ones it ignores (see
// api.CreateVolumeRequest), and a refusal for what it cannot do as asked.
func volumeSpec(req api.CreateVolumeRequest) (machines.VolumeSpec, error) {
	spec := machines.VolumeSpec{Name: req.Name}
	if req.FSType != nil && *req.FSType != "ext4" {
		return spec, errdefs.New(errdefs.ErrNotImplemented, "fstype=%q: kiln volumes are ext4 filesystems; leave fstype out or give ext4", *req.FSType)
	}
	if req.SizeGB != nil {
		if *req.SizeGB < 1 {
			return spec, errdefs.Invalid("size_gb=%d: give a whole number of GiB from 1 to 16384, or leave it out", *req.SizeGB)
		}
		spec.SizeGB = *req.SizeGB
	}
	if req.SnapshotID != nil {
		spec.SnapshotID = *req.SnapshotID
	}
	if req.SourceVolumeID != nil {
		spec.SourceID = *req.SourceVolumeID
	}
	if req.SnapshotRetention != nil {
		if *req.SnapshotRetention < 1 {
			return spec, errdefs.Invalid("snapshot_retention=%d: give a number of days from 1 to %d, or leave it out for %d", *req.SnapshotRetention, machines.MaxSnapshotRetention, machines.DefaultSnapshotRetention)
		}
		spec.SnapshotRetention = *req.SnapshotRetention
	}
	if req.AutoBackupEnabled != nil {
		spec.AutoBackup = *req.AutoBackupEnabled
	}
	return spec, nil
}

func (s *Server) createVolume(w http.ResponseWriter, r *http.Request) error {
	var req api.CreateVolumeRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	spec, err := volumeSpec(req)
	if err != nil {
		return err
	}
	v, err := s.Node.CreateVolume(r.Context(), r.PathValue("app"), spec)
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

func (s *Server) updateVolume(w http.ResponseWriter, r *http.Request) error {
	var req api.UpdateVolumeRequest
	if err := decode(r, &req); err != nil {
		return err
	}
	v, err := s.Node.UpdateVolume(r.Context(), r.PathValue("app"), r.PathValue("id"), req.SnapshotRetention, req.AutoBackupEnabled)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, volumeAPI(v))
	return nil
}

// deleteVolume answers, as Fly does, with the volume as it was, destroyed.
func (s *Server) deleteVolume(w http.ResponseWriter, r *http.Request) error {
	v, err := s.Node.DeleteVolume(r.Context(), r.PathValue("app"), r.PathValue("id"))
	if err != nil {
		return err
	}
	out := volumeAPI(v)
	out.State = "destroyed"
	writeJSON(w, http.StatusOK, out)
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

// snapshotAPI is a snapshot in Fly's shape; a snapshot kiln lists is complete.
func snapshotAPI(sn store.Snapshot) api.Snapshot {
	days := sn.RetentionDays
	return api.Snapshot{ID: sn.ID, VolumeID: sn.VolumeID, Size: sn.StoredBytes, VolumeSize: sn.SizeBytes, CreatedAt: sn.CreatedAt,
		Status: "created", RetentionDays: &days}
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

// createSnapshot takes no body (Fly's client sends none) and answers with the snapshot,
// where Fly answers with nothing.
func (s *Server) createSnapshot(w http.ResponseWriter, r *http.Request) error {
	sn, err := s.Node.SnapshotVolume(r.Context(), r.PathValue("app"), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, snapshotAPI(sn))
	return nil
}
