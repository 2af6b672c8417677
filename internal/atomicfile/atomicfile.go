// Package atomicfile writes kiln's state files so that a crash or power loss leaves
// either the old content or the new, never a mix, an empty file or a stray temp file
// under the final name. Every file kiln keeps across restarts (records, offsets, tokens,
// caches, converted images) is written through it.
//
// The sequence is the one POSIX needs for durability: a temp file of its own in the
// same directory (so two writers of one path never share it, and the rename stays on
// one filesystem), the data, fsync of the file, rename over the final name, fsync of the
// directory (so the rename itself survives a power loss).
//
// The calls take no context: none of these system calls can be interrupted, so a
// context could not stop them and would only promise that it might.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// File is a file being written in place of a path: nothing appears at the path until
// Commit. Write to it as to any *os.File (it is one: seek, truncate, hand it to a
// writer that needs an io.WriteSeeker). Defer Abort right after Create: after a Commit
// it does nothing, before one it removes the temp file.
type File struct {
	*os.File
	path string
	perm fs.FileMode
	done bool
}

// Create starts writing path: a new temp file, unique to this call, beside it, named
// .BASE.tmp-RANDOM (a crash can leave one: sweep a directory's leftovers with the glob
// ".*.tmp-*"). perm is the final file's mode, exactly (no umask: state files get the
// mode kiln asks for).
func Create(path string, perm fs.FileMode) (*File, error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	return &File{File: f, path: path, perm: perm}, nil
}

// Commit makes what was written the content of the path: mode set, data flushed to
// disk, temp file renamed over the path, directory flushed. On an error the path keeps
// its old content and the temp file is gone.
func (f *File) Commit() error {
	if f.done {
		return fmt.Errorf("writing %s: already committed or aborted", f.path)
	}
	err := f.Chmod(f.perm)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.File.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), f.path)
	}
	if err != nil {
		f.Abort()
		return fmt.Errorf("writing %s: %w", f.path, err)
	}
	f.done = true
	if err := SyncDir(filepath.Dir(f.path)); err != nil {
		return fmt.Errorf("writing %s: %w", f.path, err)
	}
	return nil
}

// Abort drops the temp file; the path is left as it was. After Commit it does nothing,
// so it is safe to defer.
func (f *File) Abort() error {
	if f.done {
		return nil
	}
	f.done = true
	f.File.Close()
	if err := os.Remove(f.Name()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// Close is Abort: a File is finished with Commit, and closing one without it must not
// publish a half-written file.
func (f *File) Close() error { return f.Abort() }

// WriteFile replaces path's content with data, atomically and durably, with mode perm.
func WriteFile(path string, data []byte, perm fs.FileMode) error {
	f, err := Create(path, perm)
	if err != nil {
		return err
	}
	defer f.Abort()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return f.Commit()
}

// Rename publishes a file or directory made by other means (a tool such as mkfs.ext4
// that writes its own output, or an unpacked tree) under its final name: it flushes
// from (for a directory, its entries, not the tree below), renames it to to and flushes
// both directories, so that the move survives a power loss. from must be unique to its
// writer, as a name from os.MkdirTemp is.
func Rename(from, to string) error {
	if err := syncPath(from); err != nil {
		return err
	}
	if err := os.Rename(from, to); err != nil {
		return err
	}
	if err := SyncDir(filepath.Dir(to)); err != nil {
		return err
	}
	if df := filepath.Dir(from); df != filepath.Dir(to) {
		return SyncDir(df)
	}
	return nil
}

func syncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("flushing %s: %w", path, err)
	}
	return nil
}

// SyncDir flushes a directory's entries (a rename, a new or removed file) to disk.
func SyncDir(dir string) error { return syncPath(dir) }
