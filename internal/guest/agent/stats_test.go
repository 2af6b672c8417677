package agent_test

import (
	"context"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/guest/agent"
)

// Through the agent protocol, on the real /proc, stats report the host's memory and one
// filesystem for each mount the agent was given, with its size.
func TestStats(t *testing.T) {
	dir := t.TempDir()
	c := connectWith(t, func(a *agent.Agent) { a.Mounts = []string{"/", dir, dir + "/gone"} })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.MemTotal == 0 || st.MemAvailable == 0 || st.MemAvailable > st.MemTotal {
		t.Errorf("mem_total %d mem_available %d; want both read, available under total", st.MemTotal, st.MemAvailable)
	}
	// A mount that cannot be read (unmounted meanwhile) is left out.
	if len(st.Filesystems) != 2 || st.Filesystems[0].Mount != "/" || st.Filesystems[1].Mount != dir {
		t.Fatalf("filesystems %+v; want / and %s", st.Filesystems, dir)
	}
	for _, f := range st.Filesystems {
		if f.Blocks == 0 || f.BlockSize == 0 || f.BlocksFree > f.Blocks {
			t.Errorf("filesystem %+v; want its size read", f)
		}
	}
}
