// Package buildcontext is the build context on the wire: a tar stream of files,
// directories and symlinks. The CLI writes one from a directory on the caller's machine
// (Open, Dir.WriteTar), honouring .dockerignore; the build service extracts one from a
// caller it does not trust (Extract) and writes its own from git checkouts and for the
// shared store (WriteTar). Both ends share the limits and the rule for where the
// Dockerfile may be, so a context the CLI refuses is one the server would refuse too.
package buildcontext

import (
	"path/filepath"
	"strings"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// MaxEntries bounds the files, directories and links in one build context.
const MaxEntries = 200000

// DefaultDockerfile is the Dockerfile a build uses when it names none.
const DefaultDockerfile = "Dockerfile"

// DockerfilePath returns the Dockerfile's path inside the context, slash-separated and
// clean: DefaultDockerfile for "", and an invalid-argument error for a path that leaves
// the context, since the server reads the Dockerfile from the context only.
func DockerfilePath(p string) (string, error) {
	if p == "" {
		return DefaultDockerfile, nil
	}
	df := filepath.ToSlash(filepath.Clean(p))
	if filepath.IsAbs(p) || strings.HasPrefix(df, "../") || df == ".." {
		return "", errdefs.Invalid("dockerfile %q must be a path inside the context", p)
	}
	return df, nil
}
