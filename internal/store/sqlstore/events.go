package sqlstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/store"
)

var _ store.EventLog = (*DB)(nil)

// journalLock serialises, on PostgreSQL, the transactions that write to the journal from
// the moment one takes a seq until it commits. Without it a transaction could take seq 10,
// another seq 11 and commit first, and a follower that read 11 would resume after it and
// never see 10. With it seqs become visible in the order they are taken. SQLite has one
// writer at a time, so there they already do.
const journalLock = 0x6b696c6e2d657674 // "kiln-evt"

// appendJournal writes e to the journal in tx, the transaction making the change e
// describes.
func (s *DB) appendJournal(ctx context.Context, tx *sql.Tx, e store.Event) error {
	if s.pg {
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(journalLock)); err != nil {
			return fmt.Errorf("locking the event journal: %w", err)
		}
	}
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e = e.Clipped()
	_, err := tx.ExecContext(ctx, s.q(`INSERT INTO events (ts, type, app, machine_id, project, build_id, host, state, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`),
		e.Time.UTC(), e.Type, e.App, e.MachineID, e.Project, e.BuildID, e.Host, e.State, e.Message)
	if err != nil {
		return fmt.Errorf("writing the event journal: %w", err)
	}
	return nil
}

// machineEvent is the journal's entry for a machine's event. kiln's own machines (the
// builders) are left out: their app does not exist for the API, and their builds have
// entries of their own.
func machineEvent(id, app, host string, ev machine.Event) (store.Event, bool) {
	if machine.InternalApp(app) {
		return store.Event{}, false
	}
	msg := ev.Message
	if ev.ExitCode != nil {
		msg = strings.TrimSuffix(fmt.Sprintf("exit code %d; %s", *ev.ExitCode, msg), "; ")
	}
	return store.Event{Time: ev.Timestamp, Type: "machine." + ev.Type, App: app, MachineID: id, Host: host,
		State: string(ev.Status), Message: msg}, true
}

// buildEvent is the journal's entry for a build entering its state; the message is what
// went wrong, if something did.
func buildEvent(b store.Build) store.Event {
	var res api.BuildResult
	json.Unmarshal(b.Result, &res)
	msg := res.Error
	if msg == "" && b.State == "queued" && len(res.Retries) > 0 {
		msg = "retrying: " + res.Retries[len(res.Retries)-1]
	}
	return store.Event{Type: "build." + b.State, Project: b.Project, BuildID: b.ID, Host: b.Host, State: b.State, Message: msg}
}

// commit commits a transaction that wrote to the journal and wakes this process's
// followers.
func (s *DB) commit(tx *sql.Tx) error {
	if err := tx.Commit(); err != nil {
		return err
	}
	s.wakeMu.Lock()
	if s.wake != nil {
		close(s.wake)
		s.wake = nil
	}
	s.wakeMu.Unlock()
	return nil
}

// EventsWritten is closed at the next commit of an event by this process.
func (s *DB) EventsWritten() <-chan struct{} {
	s.wakeMu.Lock()
	defer s.wakeMu.Unlock()
	if s.wake == nil {
		s.wake = make(chan struct{})
	}
	return s.wake
}

// ListEvents lists the events f selects, oldest first.
func (s *DB) ListEvents(ctx context.Context, f store.EventFilter) ([]store.Event, error) {
	where, args := []string{`seq > ?`}, []any{f.After}
	for _, c := range []struct{ col, v string }{{"app", f.App}, {"machine_id", f.Machine}, {"project", f.Project}, {"build_id", f.Build}} {
		if c.v != "" {
			where, args = append(where, c.col+` = ?`), append(args, c.v)
		}
	}
	if len(f.Types) > 0 {
		where, args = append(where, `type IN (`+marks(len(f.Types))+`)`), appendAll(args, f.Types)
	}
	if f.Apps != nil || f.Projects != nil {
		var reach []string
		if len(f.Apps) > 0 {
			reach, args = append(reach, `app IN (`+marks(len(f.Apps))+`)`), appendAll(args, f.Apps)
		}
		if len(f.Projects) > 0 {
			reach, args = append(reach, `project IN (`+marks(len(f.Projects))+`)`), appendAll(args, f.Projects)
		}
		if len(reach) == 0 {
			return nil, nil
		}
		where = append(where, `(`+strings.Join(reach, ` OR `)+`)`)
	}
	limit := f.Limit
	if limit <= 0 || limit > store.MaxEventPage {
		limit = store.MaxEventPage
	}
	q := `SELECT seq, ts, type, app, machine_id, project, build_id, host, state, message FROM events WHERE ` + strings.Join(where, ` AND `)
	if f.Newest {
		q = `SELECT * FROM (` + q + ` ORDER BY seq DESC LIMIT ?) AS tail ORDER BY seq`
	} else {
		q += ` ORDER BY seq LIMIT ?`
	}
	rows, err := s.db.QueryContext(ctx, s.q(q), append(args, limit)...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.Event
	for rows.Next() {
		var e store.Event
		if err := rows.Scan(&e.ID, &e.Time, &e.Type, &e.App, &e.MachineID, &e.Project, &e.BuildID, &e.Host, &e.State, &e.Message); err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

// PruneEvents deletes the events older than before.
func (s *DB) PruneEvents(ctx context.Context, before time.Time) (int64, error) {
	res, err := s.db.ExecContext(ctx, s.q(`DELETE FROM events WHERE ts < ?`), before.UTC())
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// marks is n placeholders, comma-separated.
func marks(n int) string { return `?` + strings.Repeat(`, ?`, n-1) }

func appendAll(args []any, vs []string) []any {
	for _, v := range vs {
		args = append(args, v)
	}
	return args
}
