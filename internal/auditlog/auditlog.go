// Package auditlog bounds what callers without a token can write to the audit log.
// Every call with a token is recorded; calls without one (anyone can send them, as
// fast as the network allows) are recorded up to a rate, and those past it are counted
// in one entry per second instead, so that the log cannot be used to fill the disk.
// Prune keeps the server's journals (this log, and the event journal) to their retention.
package auditlog

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kilnhq/kiln/internal/store"
)

// DefaultRetention is how long entries are kept unless the operator says otherwise.
const DefaultRetention = 90 * 24 * time.Hour

// Retention is one of the server's journals kept for a time: the audit log, the event
// journal. Prune keeps them all in one loop.
type Retention struct {
	// What names the entries ("audit entries") and Flag the setting of Keep
	// ("--audit-retention"), for the log.
	What, Flag string
	// Keep is how long an entry is kept; 0 keeps them all.
	Keep time.Duration
	// Prune deletes the entries older than before and says how many.
	Prune func(ctx context.Context, before time.Time) (int64, error)
}

// Prune deletes, every hour until ctx ends, the entries of each journal older than it
// keeps them.
func Prune(ctx context.Context, logf func(string, ...any), rs ...Retention) {
	for {
		for _, r := range rs {
			if r.Keep <= 0 {
				continue
			}
			if n, err := r.Prune(ctx, time.Now().Add(-r.Keep)); err != nil && ctx.Err() == nil {
				logf("pruning %s older than %s: %v", r.What, r.Keep, err)
			} else if n > 0 {
				logf("deleted %d %s older than %s (%s)", n, r.What, r.Keep, r.Flag)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Hour):
		}
	}
}

// DefaultAnonymousPerSecond is how many refusals of callers without a valid token are
// recorded one by one each second.
const DefaultAnonymousPerSecond = 20

// Budget lets through up to PerSecond events each second and counts the rest, so that
// what anyone can cause as fast as the network allows (audit entries, log lines of calls
// without a token) stays bounded and is still accounted for.
type Budget struct {
	PerSecond int

	mu      sync.Mutex
	window  time.Time // the second being counted
	n       int       // events in it
	dropped int       // of those, not let through
}

func (b *Budget) limit() int {
	if b.PerSecond <= 0 {
		return DefaultAnonymousPerSecond
	}
	return b.PerSecond
}

// Take counts one event at t. ok says it is within its second's budget. dropped, when
// not zero, is how many the last counted second turned away, reported once (by the
// first event of a later second) with that second: the caller writes one summary.
func (b *Budget) Take(t time.Time) (ok bool, dropped int, second time.Time) {
	per := b.limit()
	sec := t.Truncate(time.Second)
	b.mu.Lock()
	defer b.mu.Unlock()
	if !sec.Equal(b.window) {
		dropped, second = b.dropped, b.window
		b.window, b.n, b.dropped = sec, 0, 0
	}
	b.n++
	if b.n > per {
		b.dropped++
		return false, dropped, second
	}
	return true, dropped, second
}

// Limited is a store.Audit that bounds anonymous entries.
type Limited struct {
	store.Audit
	PerSecond int

	once   sync.Once
	budget *Budget
	source atomic.Value // the last dropped entry's source
}

// AddAudit records e, unless it is anonymous and past the second's budget.
func (l *Limited) AddAudit(ctx context.Context, e store.AuditEntry) error {
	if e.TokenID != "" {
		return l.Audit.AddAudit(ctx, e)
	}
	l.once.Do(func() { l.budget = &Budget{PerSecond: l.PerSecond} })
	ok, dropped, sec := l.budget.Take(e.At)
	if dropped > 0 {
		src, _ := l.source.Load().(string)
		summary := store.AuditEntry{At: sec.Add(time.Second - time.Nanosecond),
			Action: "unauthenticated calls past " + strconv.Itoa(l.budget.limit()) + "/s, not recorded one by one",
			Target: strconv.Itoa(dropped), Result: 401, Source: src}
		if err := l.Audit.AddAudit(ctx, summary); err != nil {
			return err
		}
	}
	if !ok {
		l.source.Store(e.Source)
		return nil
	}
	return l.Audit.AddAudit(ctx, e)
}
