package auditlog_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/auditlog"
	"github.com/kilnhq/kiln/internal/store"
)

type mem struct{ es []store.AuditEntry }

func (m *mem) AddAudit(_ context.Context, e store.AuditEntry) error {
	m.es = append(m.es, e)
	return nil
}
func (m *mem) PruneAudit(context.Context, time.Time) (int64, error) { return 0, nil }
func (m *mem) ListAudit(context.Context, store.AuditFilter) ([]store.AuditEntry, error) {
	return m.es, nil
}

// A flood of calls without a token costs PerSecond entries a second plus one that
// counts the rest; calls with a token are all recorded.
func TestAnonymousFloodIsBounded(t *testing.T) {
	m := &mem{}
	l := &auditlog.Limited{Audit: m, PerSecond: 5}
	ctx := context.Background()
	t0 := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	for i := range 1000 {
		l.AddAudit(ctx, store.AuditEntry{At: t0.Add(time.Duration(i) * time.Millisecond), Result: 401, Source: "10.0.0.9"})
		l.AddAudit(ctx, store.AuditEntry{At: t0.Add(time.Duration(i) * time.Millisecond), TokenID: "tok_a", Result: 404})
	}
	l.AddAudit(ctx, store.AuditEntry{At: t0.Add(time.Second), Result: 401}) // the next second
	anon, tok := 0, 0
	var summary store.AuditEntry
	for _, e := range m.es {
		switch {
		case e.TokenID != "":
			tok++
		case e.Target != "":
			summary = e
		default:
			anon++
		}
	}
	if tok != 1000 || anon != 6 || summary.Target != "995" || summary.Source != "10.0.0.9" {
		t.Errorf("%d token entries, %d anonymous, summary %+v; want 1000, 5+1, 995 dropped", tok, anon, summary)
	}
}

// One loop prunes every journal at once, each by its own retention; one kept for ever
// is left alone.
func TestPruneKeepsEachJournalItsTime(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cutoffs := make(chan string, 3)
	pruner := func(name string) func(context.Context, time.Time) (int64, error) {
		return func(_ context.Context, before time.Time) (int64, error) {
			cutoffs <- name + " " + time.Since(before).Round(time.Hour).String()
			return 1, nil
		}
	}
	done := make(chan struct{})
	var logged []string
	go func() {
		defer close(done)
		auditlog.Prune(ctx, func(f string, args ...any) { logged = append(logged, fmt.Sprintf(f, args...)) },
			auditlog.Retention{What: "audit entries", Flag: "--audit-retention", Keep: 90 * 24 * time.Hour, Prune: pruner("audit")},
			auditlog.Retention{What: "events", Flag: "--event-retention", Keep: 0, Prune: pruner("kept")},
			auditlog.Retention{What: "events", Flag: "--event-retention", Keep: 30 * 24 * time.Hour, Prune: pruner("events")})
	}()
	got := []string{<-cutoffs, <-cutoffs}
	cancel()
	<-done
	if want := []string{"audit 2160h0m0s", "events 720h0m0s"}; fmt.Sprint(got) != fmt.Sprint(want) || len(cutoffs) != 0 {
		t.Errorf("pruned %v (and %d more), want %v", got, len(cutoffs), want)
	}
	if len(logged) != 2 || !strings.Contains(logged[1], "deleted 1 events older than 720h0m0s (--event-retention)") {
		t.Errorf("logged %q", logged)
	}
}

// A budget lets PerSecond events through each second and reports what it turned away
// once, with its second, at the next second's first event.
func TestBudget(t *testing.T) {
	b := auditlog.Budget{PerSecond: 2}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var oks int
	for i := range 5 {
		ok, dropped, _ := b.Take(t0.Add(time.Duration(i) * time.Millisecond))
		if ok {
			oks++
		}
		if dropped != 0 {
			t.Fatalf("dropped reported within the second: %d", dropped)
		}
	}
	if oks != 2 {
		t.Errorf("%d let through, want 2", oks)
	}
	ok, dropped, sec := b.Take(t0.Add(1500 * time.Millisecond))
	if !ok || dropped != 3 || !sec.Equal(t0) {
		t.Errorf("next second: ok %v, dropped %d of %v; want true, 3 of %v", ok, dropped, sec, t0)
	}
	if _, dropped, _ := b.Take(t0.Add(2500 * time.Millisecond)); dropped != 0 {
		t.Errorf("a second with nothing dropped reports %d", dropped)
	}
}
