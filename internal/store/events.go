package store

import (
	"context"
	"strings"
	"time"
)

// Event is one entry of the journal of everything that happens: a machine's event (of
// type machine.<its type>) or a build's change of state (build.<the new state>). The
// store writes it in the transaction that makes the change it describes.
type Event struct {
	// ID orders the journal (its seq): a later event has a larger one, and a
	// follower resumes after the last it saw.
	ID        int64     `json:"id"`
	Time      time.Time `json:"time"`
	Type      string    `json:"type"`
	App       string    `json:"app"`
	MachineID string    `json:"machine_id"`
	Project   string    `json:"project"`
	BuildID   string    `json:"build_id"`
	Host      string    `json:"host"`
	State     string    `json:"state"`
	Message   string    `json:"message"`
}

// MaxEventMessage bounds an event's message: an exit or a build's failure can carry
// text a guest or a Dockerfile chose.
const MaxEventMessage = 1024

// Clipped returns e safe to keep and show: every text field valid UTF-8 without NUL
// bytes (PostgreSQL refuses both, and a refused event would refuse the change it
// describes), the message at most MaxEventMessage bytes and the names at most
// maxAuditField.
func (e Event) Clipped() Event {
	for _, f := range []*string{&e.Type, &e.App, &e.MachineID, &e.Project, &e.BuildID, &e.Host, &e.State, &e.Message} {
		n := maxAuditField
		if f == &e.Message {
			n = MaxEventMessage
		}
		*f = CleanText(*f, n)
	}
	return e
}

// CleanText returns s as a database keeps it safely: valid UTF-8 without NUL bytes
// (PostgreSQL refuses both) and at most n bytes.
func CleanText(s string, n int) string {
	return clip(strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", ""), n)
}

// clip cuts s to at most n bytes, a cut one ending in "…", never inside a character.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n-len("…")], "") + "…"
}

// EventFilter selects events. Every field set narrows the selection.
type EventFilter struct {
	// After skips the events up to this Seq.
	After int64
	// Newest takes the newest Limit events after After instead of the oldest: the tail
	// of the journal rather than its next page. Either way they come oldest first.
	Newest bool
	// App, Machine, Project and Build keep the events naming them.
	App, Machine, Project, Build string
	// Types keeps the events of these types.
	Types []string
	// Apps and Projects, when either is not nil, keep only events of these apps or of
	// these projects: what a scoped token reaches. Empty lists reach nothing.
	Apps, Projects []string
	// Limit bounds how many come back; 0 or too many is MaxEventPage.
	Limit int
}

// DefaultEventRetention is how long the journal keeps an event unless the operator says
// otherwise (kiln server --event-retention).
const DefaultEventRetention = 30 * 24 * time.Hour

// MaxEventPage bounds one read of the journal.
const MaxEventPage = 1000

// EventLog is the journal of events across the system. Nothing but the store's own
// changes writes to it; retention deletes from its old end.
type EventLog interface {
	// ListEvents lists the events f selects, oldest first.
	ListEvents(ctx context.Context, f EventFilter) ([]Event, error)
	// PruneEvents deletes the events older than before (the operator's retention) and
	// says how many.
	PruneEvents(ctx context.Context, before time.Time) (int64, error)
	// EventsWritten is closed when this process next writes an event: a follower here
	// wakes at once instead of at its next poll (which events other hosts write need).
	EventsWritten() <-chan struct{}
}
