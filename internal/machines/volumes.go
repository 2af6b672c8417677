package machines

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/volume"
)

// VolumeDir is where volume images live, under the manager's data.
func (s *Service) volumeDir() string { return filepath.Join(filepath.Dir(s.cfg.Dir), "volumes") }

// DefaultSnapshotRetention is the store's: five days, as on Fly.
const DefaultSnapshotRetention = store.DefaultSnapshotRetention

// MaxSnapshotRetention is the longest retention Fly allows, in days.
const MaxSnapshotRetention = 60

// volumeNameRE is Fly's rule for volume names (lowercase letters, digits and
// underscores, which Fly's own tools use, as in pg_data) with kiln's dashes and length.
var volumeNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)

// VolumeSpec is what a new volume is made of. At most one of SnapshotID and SourceID
// is set.
type VolumeSpec struct {
	Name string
	// SizeGB 0 is the size of the snapshot or source volume, or 1 GiB for an empty one.
	SizeGB int
	// SnapshotID restores a snapshot of one of the app's volumes.
	SnapshotID string
	// SourceID forks one of the app's volumes: the new one starts as a copy of it.
	SourceID string
	// SnapshotRetention is in days; 0 is DefaultSnapshotRetention.
	SnapshotRetention int
	AutoBackup        bool
}

func checkRetention(days int) error {
	if days < 1 || days > MaxSnapshotRetention {
		return errdefs.Invalid("snapshot_retention=%d: give a number of days from 1 to %d", days, MaxSnapshotRetention)
	}
	return nil
}

// CreateVolume makes a named volume for app: empty, from a snapshot of one of the app's
// volumes, or a fork of one. The image file first, then the record, so a failure leaves
// neither.
func (s *Service) CreateVolume(ctx context.Context, app string, spec VolumeSpec) (store.Volume, error) {
	if !volumeNameRE.MatchString(spec.Name) {
		return store.Volume{}, errdefs.Invalid("volume name %q: use lowercase letters, digits, underscores and dashes, up to 63", spec.Name)
	}
	if spec.SizeGB < 0 || spec.SizeGB > 16384 {
		return store.Volume{}, errdefs.Invalid("size_gb=%d: give a whole number of GiB from 1 to 16384", spec.SizeGB)
	}
	if spec.SnapshotID != "" && spec.SourceID != "" {
		return store.Volume{}, errdefs.Invalid("snapshot_id and source_volume_id are both set: a volume starts from one of them")
	}
	if spec.SnapshotRetention == 0 {
		spec.SnapshotRetention = DefaultSnapshotRetention
	}
	if err := checkRetention(spec.SnapshotRetention); err != nil {
		return store.Volume{}, err
	}
	if _, err := s.cfg.Store.ListMachines(ctx, app); err != nil {
		return store.Volume{}, err
	}
	if _, err := s.cfg.Store.GetVolume(ctx, app, spec.Name); err == nil {
		return store.Volume{}, errdefs.New(errdefs.ErrConflict, "app %s already has a volume named %s: choose another name", app, spec.Name)
	}
	id := "vol_" + newID()
	v := store.Volume{ID: id, App: app, Name: spec.Name, Path: filepath.Join(s.volumeDir(), id+".ext4"),
		SnapshotRetention: spec.SnapshotRetention, AutoBackup: spec.AutoBackup}
	// fill writes the image: a copy of what it starts from, or a new filesystem.
	var fill func() error
	from, fromSize := "", int64(1)<<30
	switch {
	case spec.SnapshotID != "":
		sn, err := s.cfg.Store.Snapshot(ctx, app, spec.SnapshotID)
		if err != nil {
			return v, err
		}
		from, fromSize = "snapshot "+sn.ID, sn.SizeBytes
		fill = func() error { return sparseCopy(ctx, sn.Path, v.Path) }
	case spec.SourceID != "":
		src, err := s.cfg.Store.GetVolume(ctx, app, spec.SourceID)
		if err != nil {
			return v, err
		}
		from, fromSize = "source volume "+src.Name, src.SizeBytes
		fill = func() error { return s.copyVolume(ctx, src, v.Path) }
	default:
		fill = func() error { return volume.Create(ctx, v.Path, v.SizeBytes, "") }
	}
	v.SizeBytes = int64(spec.SizeGB) << 30
	if spec.SizeGB == 0 {
		v.SizeBytes = fromSize
	}
	if v.SizeBytes < fromSize {
		return v, errdefs.Invalid("size_gb=%d is smaller than %s (%d GiB): leave size_gb out to take its size, or give more", spec.SizeGB, from, fromSize>>30)
	}
	if err := diskRoom(s.volumeDir(), v.SizeBytes); err != nil {
		return v, err
	}
	if err := fill(); err != nil {
		return v, err
	}
	if from != "" && v.SizeBytes > fromSize {
		if err := volume.Extend(ctx, v.Path, v.SizeBytes); err != nil {
			os.Remove(v.Path)
			return v, err
		}
	}
	if err := s.cfg.Store.CreateVolume(ctx, v); err != nil {
		os.Remove(v.Path)
		return v, err
	}
	return s.cfg.Store.GetVolume(ctx, app, id)
}

// UpdateVolume changes how long a volume keeps its snapshots and whether it gets one a
// day; nil leaves a setting as it is.
func (s *Service) UpdateVolume(ctx context.Context, app, idOrName string, retentionDays *int, autoBackup *bool) (store.Volume, error) {
	v, err := s.cfg.Store.GetVolume(ctx, app, idOrName)
	if err != nil {
		return v, err
	}
	if retentionDays != nil {
		if err := checkRetention(*retentionDays); err != nil {
			return v, err
		}
		v.SnapshotRetention = *retentionDays
	}
	if autoBackup != nil {
		v.AutoBackup = *autoBackup
	}
	if err := s.cfg.Store.SetVolumeSnapshots(ctx, v.ID, v.SnapshotRetention, v.AutoBackup); err != nil {
		return v, err
	}
	return s.cfg.Store.GetVolume(ctx, app, v.ID)
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

// DeleteVolume removes a volume no machine holds, with its snapshots, and returns what
// it was.
func (s *Service) DeleteVolume(ctx context.Context, app, idOrName string) (store.Volume, error) {
	v, err := s.cfg.Store.GetVolume(ctx, app, idOrName)
	if err != nil {
		return v, err
	}
	snaps, err := s.cfg.Store.Snapshots(ctx, v.ID)
	if err != nil {
		return v, err
	}
	if err := s.cfg.Store.DeleteVolume(ctx, v.ID); err != nil {
		return v, err
	}
	for _, sn := range snaps {
		os.Remove(sn.Path)
	}
	os.Remove(filepath.Join(s.volumeDir(), "snapshots", v.ID))
	return v, os.Remove(v.Path)
}

// SnapshotVolume copies a volume as it is now (see copyVolume).
func (s *Service) SnapshotVolume(ctx context.Context, app, idOrName string) (store.Snapshot, error) {
	v, err := s.cfg.Store.GetVolume(ctx, app, idOrName)
	if err != nil {
		return store.Snapshot{}, err
	}
	return s.snapshot(ctx, v, time.Time{})
}

// snapshot copies v into a new snapshot taken at (zero: now).
func (s *Service) snapshot(ctx context.Context, v store.Volume, at time.Time) (store.Snapshot, error) {
	sn := store.Snapshot{ID: "vs_" + newID(), VolumeID: v.ID, SizeBytes: v.SizeBytes, CreatedAt: at}
	dir := filepath.Join(s.volumeDir(), "snapshots", v.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return sn, err
	}
	sn.Path = filepath.Join(dir, sn.ID+".ext4")
	if err := s.copyVolume(ctx, v, sn.Path); err != nil {
		return sn, err
	}
	var st unix.Stat_t
	if err := unix.Stat(sn.Path, &st); err == nil {
		sn.StoredBytes = st.Blocks * 512
	}
	if err := s.cfg.Store.AddSnapshot(ctx, sn); err != nil {
		os.Remove(sn.Path)
		return sn, err
	}
	return s.cfg.Store.Snapshot(ctx, v.App, sn.ID)
}

// copyVolume copies a volume's image as it is now to dst: what snapshots and forks are
// made of. A volume in use is flushed by its guest first; what the workload has not
// written yet is not in the copy, as with any crash-consistent block snapshot.
func (s *Service) copyVolume(ctx context.Context, v store.Volume, dst string) error {
	if vm := s.sup.Running(v.AttachedMachine); vm != nil {
		// Bounded: a guest that never answers (a frozen filesystem, a hung agent) must
		// not hold the snapshot sweep of every volume on the host.
		sctx, cancel := context.WithTimeout(ctx, syncTimeout)
		err := vm.Sync(sctx)
		cancel()
		if err != nil {
			return fmt.Errorf("flushing volume %s in machine %s: %w", v.Name, v.AttachedMachine, err)
		}
	}
	return sparseCopy(ctx, v.Path, dst)
}

// syncTimeout bounds how long a guest has to flush a volume before it is copied.
const syncTimeout = 30 * time.Second

// SweepEvery is how often SweepSnapshots looks for snapshots to take or delete.
const SweepEvery = time.Hour

// autoBackupEvery is how often a volume with auto backups gets a snapshot, as on Fly.
const autoBackupEvery = 24 * time.Hour

// SweepSnapshots runs Sweep now and every SweepEvery until ctx ends; the server runs it.
func (s *Service) SweepSnapshots(ctx context.Context) {
	t := time.NewTicker(SweepEvery)
	defer t.Stop()
	for {
		if err := s.Sweep(ctx, time.Now()); err != nil && ctx.Err() == nil {
			s.logf(ctx, "volume snapshots: %v", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Sweep, as of now, deletes the snapshots older than their volume's retention (files and
// records) and takes the daily snapshot of each volume with auto backups whose newest
// snapshot is a day old. It touches only the volumes and snapshots whose files are on
// this host: in a database hosts share, each host sweeps its own.
func (s *Service) Sweep(ctx context.Context, now time.Time) error {
	sns, err := s.cfg.Store.AllSnapshots(ctx)
	if err != nil {
		return err
	}
	var errs []error
	newest := map[string]time.Time{}
	for _, sn := range sns {
		// Retention 0 is a volume from before retention existed: its snapshots are kept
		// until deleted, as they were when they were taken.
		if sn.RetentionDays <= 0 || !now.After(sn.CreatedAt.Add(time.Duration(sn.RetentionDays)*autoBackupEvery)) {
			if sn.CreatedAt.After(newest[sn.VolumeID]) {
				newest[sn.VolumeID] = sn.CreatedAt
			}
			continue
		}
		if err := os.Remove(sn.Path); errors.Is(err, fs.ErrNotExist) && s.cfg.Host != "" {
			continue // another host's
		} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("deleting snapshot %s: %w", sn.ID, err))
			continue
		}
		if err := s.cfg.Store.DeleteSnapshot(ctx, sn.ID); err != nil {
			errs = append(errs, fmt.Errorf("deleting snapshot %s: %w", sn.ID, err))
		}
	}
	vs, err := s.cfg.Store.AllVolumes(ctx)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, v := range vs {
		if !v.AutoBackup || now.Sub(newest[v.ID]) < autoBackupEvery {
			continue
		}
		if _, err := os.Stat(v.Path); err != nil {
			continue // another host's, or going away
		}
		if _, err := s.snapshot(ctx, v, now); err != nil {
			errs = append(errs, fmt.Errorf("daily snapshot of volume %s of app %s: %w", v.Name, v.App, err))
		}
	}
	return errors.Join(errs...)
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
