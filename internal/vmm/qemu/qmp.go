package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// qmp is a minimal QEMU Machine Protocol client: one command at a time, every call
// bounded by its context, and a dead QEMU ends every call at once instead of hanging it.
// (github.com/digitalocean/go-qemu's monitor has no per-call cancellation.)
type qmp struct {
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
}

type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string `json:"event"`
	QMP   any    `json:"QMP"`
}

// dialQMP connects to path, retrying until QEMU has created the socket, and negotiates
// capabilities.
func dialQMP(ctx context.Context, path string) (*qmp, error) {
	var conn net.Conn
	var err error
	for {
		var d net.Dialer
		conn, err = d.DialContext(ctx, "unix", path)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connecting to QMP socket %s: %w", path, err)
		case <-time.After(5 * time.Millisecond):
		}
	}
	q := &qmp{conn: conn, r: bufio.NewReader(conn)}
	var greeting qmpReply
	if err := q.read(ctx, &greeting); err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading QMP greeting: %w", err)
	}
	if _, err := q.run(ctx, "qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmp) read(ctx context.Context, v *qmpReply) error {
	stop := context.AfterFunc(ctx, func() { q.conn.SetReadDeadline(time.Now()) })
	defer stop()
	line, err := q.r.ReadBytes('\n')
	if err != nil {
		return err
	}
	return json.Unmarshal(line, v)
}

// run executes one command and returns its "return" value. Events read while waiting
// are dropped: kiln learns about VM exits from the process, not from QMP events.
func (q *qmp) run(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	return q.runWithFile(ctx, cmd, args, nil)
}

// runWithFile is run with f's descriptor sent along with the command (SCM_RIGHTS), as
// getfd expects.
func (q *qmp) runWithFile(ctx context.Context, cmd string, args any, f *os.File) (json.RawMessage, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	b = append(b, '\n')
	q.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	var err error
	if f != nil {
		uc, ok := q.conn.(*net.UnixConn)
		if !ok {
			return nil, fmt.Errorf("qmp %s: a file can only be passed over a Unix socket", cmd)
		}
		_, _, err = uc.WriteMsgUnix(b, syscall.UnixRights(int(f.Fd())), nil)
	} else {
		_, err = q.conn.Write(b)
	}
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	for {
		var r qmpReply
		if err := q.read(ctx, &r); err != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, err)
		}
		if r.Event != "" {
			continue
		}
		if r.Error != nil {
			return nil, fmt.Errorf("qmp %s: %s: %s", cmd, r.Error.Class, r.Error.Desc)
		}
		return r.Return, nil
	}
}

func (q *qmp) close() error { return q.conn.Close() }
