package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/execstream"
	"github.com/kilnhq/kiln/internal/guest"
)

// upgrading says whether an exec asks to stream (Upgrade: kiln-exec).
func upgrading(r *http.Request) bool {
	return strings.EqualFold(r.Header.Get("Upgrade"), api.ExecUpgrade) &&
		strings.Contains(strings.ToLower(r.Header.Get("Connection")), "upgrade")
}

// drainAfterExit bounds how long the server reads what a client still sends after the
// exit frame, so that closing does not reset the connection before the client has it.
const drainAfterExit = 5 * time.Second

// execStream runs an exec whose input and output travel over the connection itself,
// framed by package execstream, for any size in bounded memory: the server holds one
// frame at a time, and a client that stops reading stops the guest's process in
// write(2). The process is killed when the client goes away. Errors found before the
// process starts are ordinary HTTP answers; after that the connection says.
func (s *Server) execStream(w http.ResponseWriter, r *http.Request, id string, req guest.ExecRequest) error {
	stdinR, stdinW := io.Pipe()
	// The process starts before the connection is switched, so that a machine that is
	// not running still gets a 409; its output waits (and the guest with it) until then.
	var conn *execstream.Conn
	upgraded := make(chan struct{})
	held := func(typ byte) io.Writer {
		return writerFunc(func(p []byte) (int, error) {
			<-upgraded
			return conn.Stream(typ).Write(p)
		})
	}
	p, err := s.Node.StartExec(r.Context(), id, req, guest.IO{Stdin: stdinR, Stdout: held(api.FrameStdout), Stderr: held(api.FrameStderr)})
	notFound := errors.Is(err, errdefs.ErrNotFound)
	if err != nil && !notFound {
		return err
	}
	nc, brw, herr := http.NewResponseController(w).Hijack()
	if herr != nil {
		conn = execstream.New(strings.NewReader(""), io.Discard)
		close(upgraded)
		if p != nil {
			p.Signal(int(syscall.SIGKILL))
		}
		return fmt.Errorf("switching to a streaming exec: %w", herr)
	}
	defer nc.Close()
	fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", api.ExecUpgrade)
	if err := brw.Flush(); err != nil {
		// The client left before the switch: nothing will read the output, so the
		// process must not wait for a reader that never comes.
		conn = execstream.New(strings.NewReader(""), io.Discard)
		close(upgraded)
		if p != nil {
			p.Signal(int(syscall.SIGKILL))
			p.Wait(context.WithoutCancel(r.Context()))
		}
		return nil
	}
	conn = execstream.New(brw.Reader, nc)
	close(upgraded)
	if notFound {
		// As a shell says it: the command does not exist, exit 127.
		conn.Write(api.FrameStderr, []byte(err.Error()+"\n"))
		conn.WriteJSON(api.FrameExit, api.ExecExit{ExitCode: 127})
		closeAfterExit(nc, drain(conn))
		return nil
	}

	exited := make(chan struct{})
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		defer stdinW.Close()
		for {
			typ, b, err := conn.Read()
			if err != nil {
				select {
				case <-exited:
				default:
					// The client went away: its process must not outlive it.
					p.Signal(int(syscall.SIGKILL))
				}
				return
			}
			switch typ {
			case api.FrameStdin:
				if len(b) == 0 {
					stdinW.Close()
					continue
				}
				// Blocks until the guest takes it: TCP backpressure for stdin. Once the
				// process has exited the pipe is closed and input is dropped.
				stdinW.Write(b)
			case api.FrameResize:
				var ws api.WinSize
				if json.Unmarshal(b, &ws) == nil {
					p.Resize(ws.Rows, ws.Cols)
				}
			case api.FrameSignal:
				var sr api.ExecSignalRequest
				if json.Unmarshal(b, &sr) == nil && sr.Signal > 0 {
					p.Signal(sr.Signal)
				}
			}
		}
	}()
	// The process ends by itself, by its timeout, or killed above; Wait needs no deadline.
	st, err := p.Wait(context.WithoutCancel(r.Context()))
	close(exited)
	stdinR.CloseWithError(io.ErrClosedPipe)
	if err != nil {
		conn.Write(api.FrameError, []byte(err.Error()))
	} else {
		conn.WriteJSON(api.FrameExit, api.ExecExit{ExitCode: st.Code, ExitSignal: st.Signal, TimedOut: st.TimedOut})
	}
	closeAfterExit(nc, readerDone)
	return nil
}

// drain reads and drops frames until the client closes; the channel closes then.
func drain(conn *execstream.Conn) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if _, _, err := conn.Read(); err != nil {
				return
			}
		}
	}()
	return done
}

// closeAfterExit ends the server's side after the last frame and waits a bounded time for
// the client to close its side (readerDone), reading what it still sends meanwhile.
func closeAfterExit(nc net.Conn, readerDone <-chan struct{}) {
	if cw, ok := nc.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	nc.SetReadDeadline(time.Now().Add(drainAfterExit))
	<-readerDone
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
