package daemon

import (
	"slices"
	"testing"
)

func TestCleanupsUnwindNewestFirstOnce(t *testing.T) {
	var got []string
	var c cleanups
	for _, name := range []string{"db", "listener", "network", "api"} {
		c.push(func() { got = append(got, name) })
	}
	c.unwind()
	c.unwind()
	if want := []string{"api", "network", "listener", "db"}; !slices.Equal(got, want) {
		t.Fatalf("unwound %v, want %v", got, want)
	}
}
