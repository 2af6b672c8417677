package machines

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/metrics"
	"github.com/kilnhq/kiln/internal/store"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// bootKind is an internal kind of machine whose VM boots at once.
type bootKind struct{}

func (bootKind) Boot(context.Context, store.Machine) (*vmrun.Instance, error) {
	return &vmrun.Instance{}, nil
}
func (bootKind) Resumed(context.Context, store.Machine, *vmrun.Instance) error { return nil }
func (bootKind) Stopping(context.Context, store.Machine, *vmrun.Instance)      {}

func boots(app string) uint64 {
	var m dto.Metric
	metrics.MachineBoot.WithLabelValues(app).(prometheus.Metric).Write(&m)
	return m.GetHistogram().GetSampleCount()
}

// A boot is timed under its machine's app.
func TestBootIsTimed(t *testing.T) {
	r := &vmRuntime{internal: map[string]Internal{"kiln-test": bootKind{}}}
	before := boots("kiln-test")
	vm, err := r.Boot(context.Background(), store.Machine{ID: "m1", App: "kiln-test"}, api.MachineConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if got := boots("kiln-test"); got != before+1 {
		t.Errorf("kiln_machine_boot_seconds{app=kiln-test} counted %d boots, want %d", got, before+1)
	}
	if v := vm.(*vmInstance); v.rec.App != "kiln-test" {
		t.Errorf("the VM does not know its app: %+v", v.rec)
	}
}
