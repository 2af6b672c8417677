package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/execstream"
)

// ExecSession is a streaming exec: a command running in a machine whose input and
// output travel over one connection, in bounded memory whatever their size.
type ExecSession struct {
	body io.ReadWriteCloser
	conn *execstream.Conn
}

// ExecStream starts req in machine id and returns once it runs; Run then connects it to
// the caller. req.Stdin and req.Timeout's default do not apply: input comes from Run,
// and without a timeout the command runs until it ends or the session is closed, which
// kills it.
func (c *Client) ExecStream(ctx context.Context, app, id string, req api.ExecRequest) (*ExecSession, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	// The connection outlives the request: ctx bounds only the wait for the switch.
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, cancel)
	defer stop()
	hreq, err := http.NewRequestWithContext(rctx, "POST", c.BaseURL+mpath(app, id)+"/exec", bytes.NewReader(b))
	if err != nil {
		cancel()
		return nil, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Connection", "Upgrade")
	hreq.Header.Set("Upgrade", api.ExecUpgrade)
	resp, err := c.send(hreq)
	if err != nil {
		cancel()
		return nil, err
	}
	body, ok := resp.Body.(io.ReadWriteCloser)
	if resp.StatusCode != http.StatusSwitchingProtocols || !ok {
		resp.Body.Close()
		cancel()
		return nil, fmt.Errorf("the server at %s answered a streaming exec with %s: it is older than this client, or a proxy in between does not pass Upgrade", c.BaseURL, resp.Status)
	}
	return &ExecSession{body: closeFunc{body, cancel}, conn: execstream.New(body, body)}, nil
}

type closeFunc struct {
	io.ReadWriteCloser
	cancel context.CancelFunc
}

func (c closeFunc) Close() error {
	defer c.cancel()
	return c.ReadWriteCloser.Close()
}

// Resize tells a TTY exec the terminal's new size.
func (s *ExecSession) Resize(rows, cols uint16) error {
	return s.conn.WriteJSON(api.FrameResize, api.WinSize{Rows: rows, Cols: cols})
}

// Signal delivers sig to the command.
func (s *ExecSession) Signal(sig int) error {
	return s.conn.WriteJSON(api.FrameSignal, api.ExecSignalRequest{Signal: sig})
}

// Close ends the session; a command still running is killed.
func (s *ExecSession) Close() error { return s.body.Close() }

// Run copies stdin to the command (nil: no input) and its output to stdout and stderr
// (nil: dropped) until it exits, and returns how it exited. When ctx ends the session is
// closed, killing the command. Run closes the session before it returns; it does not
// wait for a stdin that blocks in Read.
func (s *ExecSession) Run(ctx context.Context, stdin io.Reader, stdout, stderr io.Writer) (api.ExecExit, error) {
	defer s.Close()
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	go func() {
		if stdin != nil {
			io.Copy(s.conn.Stream(api.FrameStdin), stdin)
		}
		s.conn.Write(api.FrameStdin, nil) // end of input
	}()
	outs := map[byte]io.Writer{api.FrameStdout: stdout, api.FrameStderr: stderr}
	for {
		typ, p, err := s.conn.Read()
		if err != nil {
			if ctx.Err() != nil {
				return api.ExecExit{}, ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return api.ExecExit{}, fmt.Errorf("streaming exec: the connection ended before the command's exit status: %w", err)
		}
		switch typ {
		case api.FrameStdout, api.FrameStderr:
			if w := outs[typ]; w != nil {
				if _, err := w.Write(p); err != nil {
					return api.ExecExit{}, fmt.Errorf("writing the command's output: %w", err)
				}
			}
		case api.FrameExit:
			var e api.ExecExit
			if err := json.Unmarshal(p, &e); err != nil {
				return e, fmt.Errorf("streaming exec: bad exit frame: %w", err)
			}
			return e, nil
		case api.FrameError:
			return api.ExecExit{}, fmt.Errorf("exec: %s", p)
		}
	}
}
