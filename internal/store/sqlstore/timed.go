package sqlstore

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"strings"
	"time"

	"github.com/kilnhq/kiln/internal/metrics"
)

// The store's latency is taken under database/sql, at the driver's connection: every
// statement, in a transaction or not, and every begin, commit and rollback is timed
// (metrics.StoreQuery) without a call site knowing, so a query added later is timed too.
// Each optional interface of the driver's connection is passed through, and one the
// driver lacks answers as database/sql expects of an absent one.

// timedConnector opens dsn with driver d, timing what its connections do.
func timedConnector(d driver.Driver, dsn string) (driver.Connector, error) {
	var c driver.Connector = dsnConnector{d, dsn}
	if dc, ok := d.(driver.DriverContext); ok {
		var err error
		if c, err = dc.OpenConnector(dsn); err != nil {
			return nil, err
		}
	}
	return connector{c}, nil
}

// openTimed is sql.Open with every statement timed.
func openTimed(driverName, dsn string) (*sql.DB, error) {
	probe, err := sql.Open(driverName, dsn) // only to find the registered driver
	if err != nil {
		return nil, err
	}
	d := probe.Driver()
	probe.Close()
	c, err := timedConnector(d, dsn)
	if err != nil {
		return nil, err
	}
	return sql.OpenDB(c), nil
}

type dsnConnector struct {
	d   driver.Driver
	dsn string
}

func (c dsnConnector) Connect(context.Context) (driver.Conn, error) { return c.d.Open(c.dsn) }
func (c dsnConnector) Driver() driver.Driver                        { return c.d }

// connector makes connections whose statements are timed.
type connector struct{ driver.Connector }

func (c connector) Connect(ctx context.Context) (driver.Conn, error) {
	conn, err := c.Connector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &timedConn{conn}, nil
}

// timedConn is one driver connection, timed.
type timedConn struct{ driver.Conn }

var (
	_ driver.ExecerContext      = (*timedConn)(nil)
	_ driver.QueryerContext     = (*timedConn)(nil)
	_ driver.ConnPrepareContext = (*timedConn)(nil)
	_ driver.ConnBeginTx        = (*timedConn)(nil)
	_ driver.Pinger             = (*timedConn)(nil)
	_ driver.SessionResetter    = (*timedConn)(nil)
	_ driver.Validator          = (*timedConn)(nil)
	_ driver.NamedValueChecker  = (*timedConn)(nil)
)

func observe(op string, start time.Time) {
	metrics.StoreQuery.WithLabelValues(op).Observe(time.Since(start).Seconds())
}

func (c *timedConn) ExecContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Result, error) {
	e, ok := c.Conn.(driver.ExecerContext)
	if !ok {
		return nil, driver.ErrSkip // database/sql prepares the statement instead
	}
	defer observe(Operation(q), time.Now())
	return e.ExecContext(ctx, q, args)
}

func (c *timedConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	qc, ok := c.Conn.(driver.QueryerContext)
	if !ok {
		return nil, driver.ErrSkip
	}
	defer observe(Operation(q), time.Now())
	return qc.QueryContext(ctx, q, args)
}

func (c *timedConn) PrepareContext(ctx context.Context, q string) (driver.Stmt, error) {
	var st driver.Stmt
	var err error
	if p, ok := c.Conn.(driver.ConnPrepareContext); ok {
		st, err = p.PrepareContext(ctx, q)
	} else {
		st, err = c.Conn.Prepare(q)
	}
	if err != nil {
		return nil, err
	}
	return &stmt{Stmt: st, op: Operation(q)}, nil
}

func (c *timedConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	start := time.Now()
	var tx driver.Tx
	var err error
	if b, ok := c.Conn.(driver.ConnBeginTx); ok {
		tx, err = b.BeginTx(ctx, opts)
	} else {
		tx, err = c.Conn.Begin() //nolint:staticcheck // the driver has nothing newer
	}
	observe("begin", start)
	if err != nil {
		return nil, err
	}
	return timedTx{tx}, nil
}

func (c *timedConn) Ping(ctx context.Context) error {
	if p, ok := c.Conn.(driver.Pinger); ok {
		return p.Ping(ctx)
	}
	return nil
}

func (c *timedConn) ResetSession(ctx context.Context) error {
	if r, ok := c.Conn.(driver.SessionResetter); ok {
		return r.ResetSession(ctx)
	}
	return nil
}

func (c *timedConn) IsValid() bool {
	if v, ok := c.Conn.(driver.Validator); ok {
		return v.IsValid()
	}
	return true
}

func (c *timedConn) CheckNamedValue(nv *driver.NamedValue) error {
	if n, ok := c.Conn.(driver.NamedValueChecker); ok {
		return n.CheckNamedValue(nv)
	}
	return driver.ErrSkip // database/sql converts the value as it would without us
}

type timedTx struct{ driver.Tx }

func (t timedTx) Commit() error {
	defer observe("commit", time.Now())
	return t.Tx.Commit()
}

func (t timedTx) Rollback() error {
	defer observe("rollback", time.Now())
	return t.Tx.Rollback()
}

// stmt is a prepared statement, used where the driver cannot execute directly.
type stmt struct {
	driver.Stmt
	op string
}

func (s *stmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	defer observe(s.op, time.Now())
	if e, ok := s.Stmt.(driver.StmtExecContext); ok {
		return e.ExecContext(ctx, args)
	}
	vs, err := values(args)
	if err != nil {
		return nil, err
	}
	return s.Stmt.Exec(vs) //nolint:staticcheck // the driver has nothing newer
}

func (s *stmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	defer observe(s.op, time.Now())
	if q, ok := s.Stmt.(driver.StmtQueryContext); ok {
		return q.QueryContext(ctx, args)
	}
	vs, err := values(args)
	if err != nil {
		return nil, err
	}
	return s.Stmt.Query(vs) //nolint:staticcheck // the driver has nothing newer
}

func values(args []driver.NamedValue) ([]driver.Value, error) {
	vs := make([]driver.Value, len(args))
	for i, a := range args {
		if a.Name != "" {
			return nil, driver.ErrSkip
		}
		vs[i] = a.Value
	}
	return vs, nil
}

// Operation names a statement for the store's latency histogram: its verb and the table
// it acts on first ("select machines", "insert machine_events"). Statements are kiln's
// own text, never a caller's, so the names are few.
func Operation(q string) string {
	words := strings.Fields(strings.ToLower(q))
	if len(words) == 0 {
		return "other"
	}
	verb := words[0]
	var after string
	switch verb {
	case "select", "delete", "with":
		after = "from"
	case "insert":
		after = "into"
	case "update":
		after = "update"
	default:
		return "other"
	}
	for i := 0; i+1 < len(words); i++ {
		if words[i] == after && tableName(words[i+1]) {
			return verb + " " + words[i+1]
		}
	}
	return verb
}

func tableName(w string) bool {
	for _, r := range w {
		if !(r >= 'a' && r <= 'z' || r == '_' || r >= '0' && r <= '9') {
			return false
		}
	}
	return w != ""
}
