package agent

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnhq/kiln/internal/guest"
)

// A fixed /proc's meminfo and loadavg are read in bytes and as the three averages;
// lines kiln does not report are skipped.
func TestReadStats(t *testing.T) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "meminfo"), []byte(`MemTotal:        1012345 kB
MemFree:          500000 kB
MemAvailable:     800000 kB
Buffers:            1234 kB
Cached:            65536 kB
SwapCached:            7 kB
Garbage
Active: x kB
`), 0o644)
	os.WriteFile(filepath.Join(root, "loadavg"), []byte("0.52 1.58 12.00 1/467 12345\n"), 0o644)
	st, err := readStats(root, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := guest.Stats{MemTotal: 1012345 << 10, MemFree: 500000 << 10, MemAvailable: 800000 << 10, Buffers: 1234 << 10,
		Cached: 65536 << 10, Load: [3]float64{0.52, 1.58, 12}}
	if st.MemTotal != want.MemTotal || st.MemFree != want.MemFree || st.MemAvailable != want.MemAvailable ||
		st.Buffers != want.Buffers || st.Cached != want.Cached || st.Load != want.Load {
		t.Errorf("got %+v; want %+v", st, want)
	}
	if len(st.Filesystems) != 0 {
		t.Errorf("filesystems %v; want none for no mounts", st.Filesystems)
	}
}

// A loadavg of NaN reaches the host as 0: JSON cannot carry NaN, and the answer must
// still be sent.
func TestStatsBoundedLoad(t *testing.T) {
	st := guest.Stats{Load: parseLoadavg([]byte("NaN +Inf 3"))}.Bounded()
	if st.Load != [3]float64{0, 0, 3} {
		t.Errorf("load %v; want [0 0 3]", st.Load)
	}
}
