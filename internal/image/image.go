// Package image turns OCI images into root filesystems: it reads images (a `docker save`
// tarball or an OCI layout tarball), flattens their layers with whiteouts applied, and
// packs the result into an ext4 image once per image digest, shared read-only by every
// VM that runs the image. It also reads what the image says to run.
package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/Microsoft/hcsshim/ext4/tar2ext4"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kilnhq/kiln/internal/atomicfile"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/volume"
)

// OpenTarball reads the single image in a `docker save` tarball or an OCI layout
// tarball. The image reads from files that close releases; call it when done.
func OpenTarball(path string) (img v1.Image, close func(), err error) {
	return openTarball(path, path)
}

// openTarball is OpenTarball with errors calling the tarball name: a server's copy of
// an upload is a temporary file whose path means nothing to the user who sent it.
func openTarball(path, name string) (img v1.Image, close func(), err error) {
	nothing := func() {}
	if _, err := os.Stat(path); err != nil {
		return nil, nothing, errdefs.Wrap(errdefs.ErrNotFound, err, "image tarball %s", name)
	}
	names, err := checkTarball(path, name)
	if err != nil {
		return nil, nothing, err
	}
	if names["manifest.json"] {
		img, err := tarball.ImageFromPath(path, nil)
		if err != nil {
			return nil, nothing, errdefs.Wrap(errdefs.ErrInvalid, err, "%s is not a loadable image tarball (it must hold exactly one image)", name)
		}
		return img, nothing, nil
	}
	if !names["index.json"] {
		return nil, nothing, errdefs.Invalid("%s is neither a `docker save` tarball (manifest.json) nor an OCI layout (index.json)%s", name, makeOne)
	}
	dir, err := os.MkdirTemp("", "kiln-oci-")
	if err != nil {
		return nil, nothing, err
	}
	cleanup := func() { os.RemoveAll(dir) }
	defer func() {
		if err != nil {
			cleanup()
		}
	}()
	f, err := os.Open(path)
	if err != nil {
		return nil, nothing, err
	}
	defer f.Close()
	if err := untarPlain(f, dir); err != nil {
		return nil, nothing, err
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, nothing, errdefs.Wrap(errdefs.ErrInvalid, err, "%s", name)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		return nil, nothing, errdefs.Invalid("%s must hold exactly one image", name)
	}
	img, err = idx.Image(im.Manifests[0].Digest)
	if err != nil {
		return nil, nothing, err
	}
	return img, cleanup, nil
}

// makeOne says how to make what a tarball that is not an image should have been.
const makeOne = " (make one with `docker save IMAGE -o FILE.tar`, or tar an OCI layout directory)"

// Bounds on an image tarball's own entries (not its layers', which conversion bounds).
const (
	maxTarballEntries = 100_000
	maxTarballJSON    = 4 << 20 // manifest.json, index.json, configs: read whole into memory
)

// checkTarball reads an uploaded image tarball's headers once and refuses what could
// make reading it cost more than its size: sparse entries (which expand to any size when
// read), entries larger than the file itself, too many entries, and JSON documents too
// large to read into memory. It returns the tarball's top-level JSON documents' names,
// which say its format.
func checkTarball(path, name string) (map[string]bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	names := map[string]bool{}
	// On the file itself, not a buffer: the reader seeks over entries' data.
	tr := tar.NewReader(f)
	for n := 0; ; n++ {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return names, nil
		}
		if err != nil {
			return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "%s is not a tar archive%s", name, makeOne)
		}
		if name := filepath.Clean(h.Name); !strings.Contains(name, "/") && strings.HasSuffix(name, ".json") {
			names[name] = true
		}
		sparse := h.Typeflag == tar.TypeGNUSparse
		for k := range h.PAXRecords {
			sparse = sparse || strings.HasPrefix(k, "GNU.sparse.")
		}
		switch {
		case n >= maxTarballEntries:
			return nil, errdefs.Invalid("%s has more than %d entries: an image tarball holds a few files per layer", name, maxTarballEntries)
		case sparse:
			return nil, errdefs.Invalid("%s: entry %q is a sparse file; write the tarball with `docker save` or without --sparse", name, h.Name)
		case h.Size > fi.Size():
			return nil, errdefs.Invalid("%s: entry %q claims %d bytes, more than the whole tarball", name, h.Name, h.Size)
		case strings.HasSuffix(h.Name, ".json") && h.Size > maxTarballJSON:
			return nil, errdefs.Invalid("%s: %q is %d bytes, over the %d-byte limit for an image's JSON documents", name, h.Name, h.Size, maxTarballJSON)
		}
	}
}

func hasEntry(path, name string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	tr := tar.NewReader(f) // seeks over entries' data
	for {
		h, err := tr.Next()
		if err != nil {
			return false
		}
		if filepath.Clean(h.Name) == name {
			return true
		}
	}
}

// untarPlain unpacks regular files and directories (an OCI layout holds nothing else).
func untarPlain(r io.Reader, dir string) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		p, err := within(dir, h.Name)
		if err != nil {
			return err
		}
		switch h.Typeflag {
		case tar.TypeDir:
			os.MkdirAll(p, 0o755)
		case tar.TypeReg:
			os.MkdirAll(filepath.Dir(p), 0o755)
			f, err := os.Create(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			f.Close()
			if err != nil {
				return err
			}
		}
	}
}

// Run is what an image says to run, resolved against its own /etc/passwd.
type Run struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env"`
	Dir  string   `json:"dir"`
	UID  uint32   `json:"uid"`
	GID  uint32   `json:"gid"`
}

// Rootfs is a converted image.
type Rootfs struct {
	Digest string
	Path   string // ext4, shared read-only
	Run    Run
}

// Cache converts images to root filesystems under Dir, once per digest.
type Cache struct {
	Dir    string
	Limits Limits
}

// Rootfs returns img's root filesystem, converting it on first use. Progress lines go
// to log.
//
// The layers are merged as a stream and written straight into an ext4 image file by an
// ext4 writer in this process (tar2ext4): no path, mode, owner, device node, setuid bit,
// link or extended attribute from the image is ever created on the host's own
// filesystem, so nothing in an image can reach outside its own disk file.
func (c Cache) Rootfs(ctx context.Context, img v1.Image, log io.Writer) (Rootfs, error) {
	digest, err := img.Digest()
	if err != nil {
		return Rootfs{}, err
	}
	key := strings.ReplaceAll(digest.String(), ":", "-")
	out := Rootfs{Digest: digest.String(), Path: filepath.Join(c.Dir, key+".ext4")}
	meta := filepath.Join(c.Dir, key+".json")
	cached := func() bool {
		b, err := os.ReadFile(meta)
		if err != nil || json.Unmarshal(b, &out.Run) != nil {
			return false
		}
		_, err = volume.Inspect(out.Path)
		return err == nil
	}
	if cached() {
		return out, nil
	}
	// One conversion per digest at a time, and few at once: each can take an image's
	// full size in disk and a CPU for as long as it runs.
	release, err := conversions.acquire(ctx, out.Path)
	if err != nil {
		return out, err
	}
	defer release()
	if cached() {
		return out, nil // converted while this call waited
	}
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return out, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return out, errdefs.Wrap(errdefs.ErrInvalid, err, "reading the image's config")
	}
	layers, err := img.Layers()
	if err != nil {
		return out, errdefs.Wrap(errdefs.ErrInvalid, err, "reading the image's layers")
	}
	if log != nil {
		fmt.Fprintf(log, "converting image %s to a root filesystem\n", digest.String()[:19])
	}
	// Each conversion writes its own temporary file; the rename publishes it whole.
	tmp, err := atomicfile.Create(out.Path, 0o644)
	if err != nil {
		return out, err
	}
	defer tmp.Abort()
	files, err := convert(ctx, layers, tmp.File, c.Limits)
	if err != nil {
		return out, fmt.Errorf("converting image %s: %w", digest, err)
	}
	if out.Run, err = runOf(cf.Config, files); err != nil {
		return out, err
	}
	b, _ := json.Marshal(out.Run)
	if err := atomicfile.WriteFile(meta, b, 0o600); err != nil {
		return out, err
	}
	return out, tmp.Commit()
}

// MaxConversions is how many images one process converts at once.
const MaxConversions = 2

// conversions admits image conversions: one per destination, MaxConversions in all.
var conversions = &admission{slots: make(chan struct{}, MaxConversions), busy: map[string]chan struct{}{}}

type admission struct {
	slots chan struct{}
	mu    sync.Mutex
	busy  map[string]chan struct{} // closed when that key's conversion ends
}

// acquire waits until no other conversion of key runs and a slot is free.
func (a *admission) acquire(ctx context.Context, key string) (release func(), err error) {
	for {
		a.mu.Lock()
		done, taken := a.busy[key]
		if !taken {
			done = make(chan struct{})
			a.busy[key] = done
			a.mu.Unlock()
			break
		}
		a.mu.Unlock()
		select {
		case <-done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	free := func() {
		a.mu.Lock()
		close(a.busy[key])
		delete(a.busy, key)
		a.mu.Unlock()
	}
	select {
	case a.slots <- struct{}{}:
	case <-ctx.Done():
		free()
		return nil, ctx.Err()
	}
	return func() { <-a.slots; free() }, nil
}

// RemoveStale deletes the temporary files of conversions that a crash interrupted. Call
// it before any conversion starts.
func (c Cache) RemoveStale() error {
	tmps, err := filepath.Glob(filepath.Join(c.Dir, ".*.tmp-*"))
	if err != nil {
		return err
	}
	for _, t := range tmps {
		if err := os.Remove(t); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	// Trees unpacked by kiln versions before streaming conversion.
	olds, _ := filepath.Glob(filepath.Join(c.Dir, "unpack-*"))
	for _, o := range olds {
		os.RemoveAll(o)
	}
	return nil
}

// convert merges layers and writes them into dst as an ext4 filesystem. It returns the
// small files it kept to resolve the image's user (etc/passwd, etc/group).
func convert(ctx context.Context, layers []v1.Layer, dst *os.File, lim Limits) (files func(string) ([]byte, bool), err error) {
	pr, pw := io.Pipe()
	fl := newFlattener(pw, lim)
	done := make(chan error, 1)
	go func() {
		err := fl.flatten(ctx, layers)
		pw.CloseWithError(err)
		done <- err
	}()
	// Metadata room for the largest image allowed, so the cap, not the writer, decides.
	convErr := tar2ext4.ConvertTarToExt4(pr, dst, tar2ext4.MaximumDiskSize(fl.lim.MaxBytes+fl.lim.MaxBytes/4+64<<20))
	pr.CloseWithError(errConverterStopped)
	// The flattener's error says what was wrong with the image; the writer's error only
	// echoes it.
	if ferr := <-done; ferr != nil && !errors.Is(ferr, errConverterStopped) {
		return nil, ferr
	}
	if convErr != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, convErr, "writing the root filesystem")
	}
	return fl.file, padInodeBitmaps(dst, dst)
}

var errConverterStopped = errors.New("ext4 writer stopped")

// runOf resolves an image config's entrypoint, cmd, env, workdir and user.
func runOf(cfg v1.Config, files func(string) ([]byte, bool)) (Run, error) {
	r := Run{Argv: append(append([]string{}, cfg.Entrypoint...), cfg.Cmd...), Env: cfg.Env, Dir: cfg.WorkingDir}
	if cfg.User == "" {
		return r, nil
	}
	user, group, _ := strings.Cut(cfg.User, ":")
	uid, gid, err := lookup(files, user, group)
	if err != nil {
		return r, err
	}
	r.UID, r.GID = uid, gid
	return r, nil
}

// lookup resolves a user and group, by number or by name from the image's own files.
func lookup(files func(string) ([]byte, bool), user, group string) (uint32, uint32, error) {
	find := func(file, name string) ([]string, bool) {
		b, ok := files("etc/" + file)
		if !ok {
			return nil, false
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			parts := strings.Split(sc.Text(), ":")
			if len(parts) >= 4 && parts[0] == name {
				return parts, true
			}
		}
		return nil, false
	}
	var uid, gid uint64
	var err error
	if uid, err = strconv.ParseUint(user, 10, 32); err != nil {
		e, ok := find("passwd", user)
		if !ok {
			return 0, 0, errdefs.Invalid("image user %q is not in the image's /etc/passwd", user)
		}
		uid, _ = strconv.ParseUint(e[2], 10, 32)
		gid, _ = strconv.ParseUint(e[3], 10, 32)
	} else {
		gid = uid
	}
	if group != "" {
		if gid, err = strconv.ParseUint(group, 10, 32); err != nil {
			e, ok := find("group", group)
			if !ok {
				return 0, 0, errdefs.Invalid("image group %q is not in the image's /etc/group", group)
			}
			gid, _ = strconv.ParseUint(e[2], 10, 32)
		}
	}
	return uint32(uid), uint32(gid), nil
}

// within joins name to root lexically, confining it: "../x" and "/x" both land at root/x.
func within(root, name string) (string, error) {
	p := filepath.Join(root, filepath.Clean("/"+name))
	if p != root && !strings.HasPrefix(p, root+string(filepath.Separator)) {
		return "", errdefs.Invalid("image entry %q points outside the root filesystem", name)
	}
	return p, nil
}
