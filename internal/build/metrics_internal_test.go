package build

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
)

// An attempt lost to the infrastructure is counted under its project and a reason from
// a short list, whatever the failure's text.
func TestRetriesAreCountedByReason(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db, err := sqlstore.Open(ctx, filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	now := time.Now()
	if err := db.CreateBuild(ctx, store.Build{ID: "b1", Project: "metered", State: Queued, Spec: []byte(`{}`), NotBefore: now, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
	s := &Service{Store: db, Dir: dir, MaxAttempts: 3}
	queued, _ := db.GetBuild(ctx, "b1")
	running, err := s.transition(ctx, queued, Running, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.retryOrFail(ctx, running, retryInfrastructure, "builder vm-1234 did not answer on 10.0.0.7")
	var m dto.Metric
	metrics.BuildRetries.WithLabelValues("metered", retryInfrastructure).(prometheus.Metric).Write(&m)
	if got := m.GetCounter().GetValue(); got != 1 {
		t.Errorf("kiln_build_infra_retries_total{project=metered,reason=infrastructure} = %v, want 1", got)
	}
	if got, _ := db.GetBuild(ctx, "b1"); got.State != Queued {
		t.Errorf("the build is %s after a retry, want queued", got.State)
	}
}

func TestLatest(t *testing.T) {
	a := time.Now()
	b := a.Add(time.Second)
	if got := latest(a, time.Time{}, b); !got.Equal(b) {
		t.Errorf("latest = %v, want %v", got, b)
	}
}
