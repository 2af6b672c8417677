package machines

import (
	"context"
	"fmt"
	"golang.org/x/sys/unix"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/volume"
)

// VolumeDir is where volume images live, under the manager's data.
func (s *Service) volumeDir() string { return filepath.Join(filepath.Dir(s.cfg.Dir), "volumes") }

// CreateVolume makes a named volume of sizeGB for app, empty or from a snapshot of one
// of the app's volumes: the image file first, then the record, so a failure leaves
// neither.
func (s *Service) CreateVolume(ctx context.Context, app, name string, sizeGB int, snapshotID string) (store.Volume, error) {
	if err := machine.CheckName(name); err != nil {
		return store.Volume{}, errdefs.Wrap(errdefs.ErrInvalid, err, "volume")
	}
	if sizeGB < 1 || sizeGB > 16384 {
		return store.Volume{}, errdefs.Invalid("size_gb=%d: give a whole number of GiB from 1 to 16384", sizeGB)
	}
	if _, err := s.cfg.Store.ListMachines(ctx, app); err != nil {
		return store.Volume{}, err
	}
	if _, err := s.cfg.Store.GetVolume(ctx, app, name); err == nil {
		return store.Volume{}, errdefs.New(errdefs.ErrConflict, "app %s already has a volume named %s", app, name)
	}
	id := "vol_" + newID()
	if err := os.MkdirAll(s.volumeDir(), 0o700); err != nil {
		return store.Volume{}, err
	}
	v := store.Volume{ID: id, App: app, Name: name, SizeBytes: int64(sizeGB) << 30, Path: filepath.Join(s.volumeDir(), id+".ext4")}
	if snapshotID != "" {
		sn, err := s.cfg.Store.Snapshot(ctx, app, snapshotID)
		if err != nil {
			return v, err
		}
		if v.SizeBytes < sn.SizeBytes {
			return v, errdefs.Invalid("size_gb=%d is smaller than snapshot %s (%d GiB)", sizeGB, sn.ID, sn.SizeBytes>>30)
		}
		if err := sparseCopy(ctx, sn.Path, v.Path); err != nil {
			return v, err
		}
		if v.SizeBytes > sn.SizeBytes {
			if err := volume.Extend(ctx, v.Path, v.SizeBytes); err != nil {
				os.Remove(v.Path)
				return v, err
			}
		}
	} else if err := diskRoom(filepath.Dir(v.Path), v.SizeBytes); err != nil {
		return store.Volume{}, err
	} else if err := volume.Create(ctx, v.Path, v.SizeBytes, ""); err != nil {
		return v, err
	}
	if err := s.cfg.Store.CreateVolume(ctx, v); err != nil {
		os.Remove(v.Path)
		return v, err
	}
	return s.cfg.Store.GetVolume(ctx, app, id)
}

// inUse reports whether the machine holding a volume may have it mounted now.
func (s *Service) inUse(machineID string) bool {
	if machineID == "" {
		return false
	}
	rec, err := s.cfg.Store.GetMachine(context.Background(), machineID)
	return err == nil && rec.State != machine.Stopped && rec.State != machine.Created &&
		rec.State != machine.Failed && rec.State != machine.Destroyed
}

// ExtendVolume grows a volume. If its machine is running, the file grows now and the
// filesystem at the machine's next start (needsRestart).
func (s *Service) ExtendVolume(ctx context.Context, app, idOrName string, sizeGB int) (store.Volume, bool, error) {
	v, err := s.cfg.Store.GetVolume(ctx, app, idOrName)
	if err != nil {
		return v, false, err
	}
	size := int64(sizeGB) << 30
	if size <= v.SizeBytes {
		return v, false, errdefs.Invalid("size_gb=%d is not larger than the volume's %d GiB: volumes only grow", sizeGB, v.SizeBytes>>30)
	}
	// Offline, the filesystem grows now, under the disk lock so that no VM attaches it
	// mid-resize. In use, only the file grows; the filesystem follows at the next boot.
	needsRestart := s.inUse(v.AttachedMachine)
	if !needsRestart {
		lease, err := s.cfg.VMs.LockDisk(v.Path, "kiln volume extend")
		if err != nil {
			needsRestart = true
		} else {
			err = volume.Extend(ctx, v.Path, size)
			lease.Release()
			if err != nil {
				return v, false, err
			}
		}
	}
	if needsRestart {
		if err := os.Truncate(v.Path, size); err != nil {
			return v, false, fmt.Errorf("extending volume %s: %w", v.Name, err)
		}
	}
	if err := s.cfg.Store.SetVolumeSize(ctx, v.ID, size); err != nil {
		return v, false, err
	}
	v, err = s.cfg.Store.GetVolume(ctx, app, v.ID)
	return v, needsRestart, err
}

// DeleteVolume removes a volume no machine holds, with its snapshots.
func (s *Service) DeleteVolume(ctx context.Context, app, idOrName string) error {
	v, err := s.cfg.Store.GetVolume(ctx, app, idOrName)
	if err != nil {
		return err
	}
	snaps, err := s.cfg.Store.Snapshots(ctx, v.ID)
	if err != nil {
		return err
	}
	if err := s.cfg.Store.DeleteVolume(ctx, v.ID); err != nil {
		return err
	}
	for _, sn := range snaps {
		os.Remove(sn.Path)
	}
	os.Remove(filepath.Join(s.volumeDir(), "snapshots", v.ID))
	return os.Remove(v.Path)
}

// SnapshotVolume copies a volume as it is now. A volume in use is flushed by its guest
// first; what the workload has not written yet is not in the snapshot, as with any
// crash-consistent block snapshot.
func (s *Service) SnapshotVolume(ctx context.Context, app, idOrName string) (store.Snapshot, error) {
	v, err := s.cfg.Store.GetVolume(ctx, app, idOrName)
	if err != nil {
		return store.Snapshot{}, err
	}
	if vm := s.sup.Running(v.AttachedMachine); vm != nil {
		if err := vm.Sync(ctx); err != nil {
			return store.Snapshot{}, fmt.Errorf("flushing volume %s in machine %s: %w", v.Name, v.AttachedMachine, err)
		}
	}
	sn := store.Snapshot{ID: "vs_" + newID(), VolumeID: v.ID, SizeBytes: v.SizeBytes}
	dir := filepath.Join(s.volumeDir(), "snapshots", v.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return sn, err
	}
	sn.Path = filepath.Join(dir, sn.ID+".ext4")
	if err := sparseCopy(ctx, v.Path, sn.Path); err != nil {
		return sn, err
	}
	if err := s.cfg.Store.AddSnapshot(ctx, sn); err != nil {
		os.Remove(sn.Path)
		return sn, err
	}
	return sn, nil
}

// sparseCopy copies an image keeping its holes (and sharing blocks where the filesystem
// can), with coreutils' cp.
func sparseCopy(ctx context.Context, src, dst string) error {
	out, err := exec.CommandContext(ctx, "cp", "--sparse=always", "--reflink=auto", src, dst).CombinedOutput()
	if err != nil {
		os.Remove(dst)
		return fmt.Errorf("copying %s: %v: %s", src, err, out)
	}
	return nil
}

// diskRoom refuses a volume the filesystem under dir could not hold once full: volumes
// are sparse, so an overcommitted disk fails later, inside a guest, with no one told.
func diskRoom(dir string, size int64) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return err
	}
	free := int64(st.Bavail) * st.Bsize
	if size > free {
		return errdefs.New(errdefs.ErrCapacity, "not enough disk for a %d GiB volume: %d GiB free under %s", size>>30, free>>30, dir)
	}
	return nil
}
