package server

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/build"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// maxSecretBytes bounds one build secret.
const maxSecretBytes = 500 << 10

func (s *Server) builds() (*build.Service, error) {
	if s.Builds == nil {
		return nil, errdefs.New(errdefs.ErrMissingDependency, "builds are off on this server: it found no builder root filesystem (run `make setup`)")
	}
	return s.Builds, nil
}

// submitBuild takes a multipart body: a "spec" part (api.BuildSpec as JSON), any number
// of "secret:ID" parts, and the "context" part (a tar stream) last, read as it arrives.
func (s *Server) submitBuild(w http.ResponseWriter, r *http.Request) error {
	svc, err := s.builds()
	if err != nil {
		return err
	}
	mr, err := r.MultipartReader()
	if err != nil {
		return errdefs.Wrap(errdefs.ErrInvalid, err, "a build is a multipart/form-data body with spec, secret:ID and context parts")
	}
	var spec api.BuildSpec
	secrets := map[string][]byte{}
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			return errdefs.Invalid("the build has no context part: send the context as a tar stream in a part named context")
		}
		if err != nil {
			return errdefs.Wrap(errdefs.ErrInvalid, err, "reading the build request")
		}
		name := p.FormName()
		switch {
		case name == "spec":
			dec := json.NewDecoder(io.LimitReader(p, 1<<20))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&spec); err != nil {
				return errdefs.Wrap(errdefs.ErrInvalid, err, "build spec")
			}
		case strings.HasPrefix(name, "secret:"):
			id := strings.TrimPrefix(name, "secret:")
			if id == "" || strings.ContainsAny(id, "/ ,=") {
				return errdefs.Invalid("secret id %q: use letters, digits, dots, dashes and underscores", id)
			}
			b, err := io.ReadAll(io.LimitReader(p, maxSecretBytes+1))
			if err != nil {
				return err
			}
			if len(b) > maxSecretBytes {
				return errdefs.Invalid("secret %s is over %d KiB", id, maxSecretBytes>>10)
			}
			secrets[id] = b
		case name == "context":
			b, err := svc.Submit(r.Context(), r.PathValue("project"), spec, p, secrets)
			if err != nil {
				return err
			}
			writeJSON(w, http.StatusCreated, b)
			return nil
		default:
			return errdefs.Invalid("unknown part %q in the build request: send spec, secret:ID and context", name)
		}
	}
}

func (s *Server) projectBuild(r *http.Request) (*build.Service, api.Build, error) {
	svc, err := s.builds()
	if err != nil {
		return nil, api.Build{}, err
	}
	b, err := svc.Get(r.Context(), r.PathValue("id"))
	if err != nil {
		return nil, b, err
	}
	if b.Project != r.PathValue("project") {
		// Worded as the store words an unknown ID: another project's build cannot be
		// told from none.
		return nil, api.Build{}, errdefs.New(errdefs.ErrNotFound, "build %s does not exist", r.PathValue("id"))
	}
	return svc, b, nil
}

func (s *Server) listBuilds(w http.ResponseWriter, r *http.Request) error {
	svc, err := s.builds()
	if err != nil {
		return err
	}
	bs, err := svc.List(r.Context(), r.PathValue("project"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, bs)
	return nil
}

func (s *Server) getBuild(w http.ResponseWriter, r *http.Request) error {
	_, b, err := s.projectBuild(r)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, b)
	return nil
}

func (s *Server) cancelBuild(w http.ResponseWriter, r *http.Request) error {
	svc, b, err := s.projectBuild(r)
	if err != nil {
		return err
	}
	if err := svc.Cancel(r.Context(), b.ID); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}

// buildLogs streams a build's log as server-sent events: one "log" event per line, and
// with follow=true, lines as they come and an "end" event carrying the build once done.
func (s *Server) buildLogs(w http.ResponseWriter, r *http.Request) error {
	svc, b, err := s.projectBuild(r)
	if err != nil {
		return err
	}
	if s.Cluster != nil && b.Host != "" && b.Host != s.Cluster.Name() && r.Header.Get(forwardedHeader) == "" && s.Cluster.IsLive(r.Context(), b.Host) {
		// The log of the build's last attempt is on the host that ran it.
		s.forwardTo(w, r, b.Host, "build "+b.ID)
		return nil
	}
	follow := r.URL.Query().Get("follow") == "true"
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	fl, _ := w.(http.Flusher)
	var off int64
	var partial string
	send := func() {
		f, err := os.Open(svc.LogPath(b.ID))
		if err != nil {
			return
		}
		defer f.Close()
		f.Seek(off, io.SeekStart)
		rd := bufio.NewReader(f)
		for {
			line, err := rd.ReadString('\n')
			off += int64(len(line))
			if err != nil {
				partial += line
				return
			}
			fmt.Fprintf(w, "event: log\ndata: %s\n\n", strings.TrimRight(partial+line, "\r\n"))
			partial = ""
		}
	}
	for {
		send()
		if fl != nil {
			fl.Flush()
		}
		cur, err := svc.Get(r.Context(), b.ID)
		if err != nil {
			return nil
		}
		if !follow || build.Terminal(cur.State) {
			send()
			if partial != "" {
				fmt.Fprintf(w, "event: log\ndata: %s\n\n", partial)
			}
			end, _ := json.Marshal(cur)
			fmt.Fprintf(w, "event: end\ndata: %s\n\n", end)
			return nil
		}
		select {
		case <-r.Context().Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (s *Server) buildCache(w http.ResponseWriter, r *http.Request) error {
	svc, err := s.builds()
	if err != nil {
		return err
	}
	info, err := svc.CacheInfo(r.Context(), r.PathValue("project"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, info)
	return nil
}

func (s *Server) pruneBuildCache(w http.ResponseWriter, r *http.Request) error {
	svc, err := s.builds()
	if err != nil {
		return err
	}
	freed, err := svc.PruneCache(r.Context(), r.PathValue("project"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.PruneResponse{FreedBytes: freed})
	return nil
}

// removeBuilder removes a project's builder VM; its cache stays.
func (s *Server) removeBuilder(w http.ResponseWriter, r *http.Request) error {
	svc, err := s.builds()
	if err != nil {
		return err
	}
	if err := svc.RemoveBuilder(r.Context(), r.PathValue("project")); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}
