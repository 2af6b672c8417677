package buildcontext

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Exclude decides, for a path relative to the context, whether WriteTar leaves it out;
// skipDir leaves out a whole directory.
type Exclude func(rel string, isDir bool) (skip, skipDir bool)

// WriteTar writes dir's files, directories and symlinks as a tar stream with paths
// relative to dir, owned by root, leaving out what exclude says. Sockets and devices are
// left out too: nothing a build can use.
func WriteTar(w io.Writer, dir string, exclude Exclude) error {
	tw := tar.NewWriter(w)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		rel = filepath.ToSlash(rel)
		if exclude != nil {
			if skip, skipDir := exclude(rel, d.IsDir()); skipDir {
				return filepath.SkipDir
			} else if skip {
				return nil
			}
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		link := ""
		if info.Mode()&os.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		} else if !info.Mode().IsRegular() && !info.IsDir() {
			return nil
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		hdr.Name = rel
		if info.IsDir() {
			hdr.Name += "/"
		}
		hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = 0, 0, "", ""
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			if _, err = io.Copy(tw, f); err != nil {
				return fmt.Errorf("reading %s: %w", p, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// Dir is a build context directory on the caller's machine, checked before anything is
// sent: a mistake in it is the caller's to fix here, not something the server could
// report better.
type Dir struct {
	path    string
	exclude Exclude
}

// Open checks that dir is a directory holding the Dockerfile (DefaultDockerfile when
// dockerfile is "") and reads its .dockerignore. Every error is an invalid argument that
// names the path and says what to do.
func Open(dir, dockerfile string) (*Dir, error) {
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, errdefs.Invalid("the build context directory %s does not exist: give the directory that holds the Dockerfile, like `kiln build .`", dir)
	case err != nil:
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "the build context directory %s cannot be read", dir)
	case !fi.IsDir():
		return nil, errdefs.Invalid("the build context %s is not a directory: give the directory that holds the Dockerfile, like `kiln build .`, and name the file with --file", dir)
	}
	df, err := DockerfilePath(dockerfile)
	if err != nil {
		return nil, err
	}
	dfPath := filepath.Join(dir, filepath.FromSlash(df))
	fi, err = os.Stat(dfPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, errdefs.Invalid("no Dockerfile at %s: add one, or name it with --file (a path inside %s)", dfPath, dir)
	case err != nil:
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "the Dockerfile %s cannot be read", dfPath)
	case fi.IsDir():
		return nil, errdefs.Invalid("the Dockerfile %s is a directory: name the file with --file", dfPath)
	}
	pm, err := readDockerignore(dir)
	if err != nil {
		return nil, err
	}
	// The Dockerfile and .dockerignore are always sent, as docker sends them.
	keep := map[string]bool{df: true, ".dockerignore": true}
	return &Dir{path: dir, exclude: func(rel string, isDir bool) (bool, bool) {
		if pm == nil || keep[rel] {
			return false, false
		}
		if ok, _ := pm.MatchesOrParentMatches(rel); ok {
			// A directory is skipped whole only when no ! pattern could bring back
			// something below it.
			return true, isDir && !pm.Exclusions()
		}
		return false, false
	}}, nil
}

// readDockerignore reads dir's .dockerignore; nil when there is none.
func readDockerignore(dir string) (*patternmatcher.PatternMatcher, error) {
	p := filepath.Join(dir, ".dockerignore")
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "reading %s", p)
	}
	defer f.Close()
	patterns, err := ignorefile.ReadAll(f)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "reading %s", p)
	}
	pm, err := patternmatcher.New(patterns)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "%s has a bad pattern", p)
	}
	return pm, nil
}

// WriteTar writes the context as a tar stream, leaving out what .dockerignore excludes.
// A file that cannot be read, or that went away while the context was read, is the
// caller's to fix: an invalid argument naming it.
func (d *Dir) WriteTar(w io.Writer) error {
	err := WriteTar(w, d.path, d.exclude)
	if errors.Is(err, fs.ErrPermission) || errors.Is(err, fs.ErrNotExist) {
		return errdefs.Wrap(errdefs.ErrInvalid, err, "sending the build context %s (make the file readable, or leave it out with .dockerignore)", d.path)
	}
	return err
}
