package capacity

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
)

func host(name string, cpus, mem int) Host {
	return Host{Name: name, CPUs: cpus, MemoryMiB: mem, CPURatio: 1, MemRatio: 1}
}

func TestPlace(t *testing.T) {
	big := Host{Name: "big", CPUs: 8, MemoryMiB: 32768, CPURatio: 4, MemRatio: 2, ReserveCPUs: 1, ReserveMemoryMiB: 1024}
	cases := []struct {
		name  string
		hosts []Host
		used  map[string]Size
		req   Request
		want  string // host, or the error's text
	}{
		{"fits", []Host{host("a", 4, 8192)}, nil, Request{Size: Size{1, 1024}}, "a"},
		{"spreads to the freest", []Host{host("a", 4, 8192), host("b", 4, 8192)}, map[string]Size{"a": {1, 4096}}, Request{Size: Size{1, 1024}}, "b"},
		{"memory overcommit lets builders ask for more than RAM", []Host{big}, nil, Request{Size: Size{8, 60000}}, "big"},
		{"overcommit has an end", []Host{big}, map[string]Size{"big": {0, 62000}}, Request{Size: Size{1, 2048}},
			"not enough memory on host big: 2048 MiB asked, 62000 of 63488 MiB in use ((32768 MiB − 1024 reserved) × 2 overcommit)"},
		{"CPU overcommit", []Host{big}, map[string]Size{"big": {27, 0}}, Request{Size: Size{2, 128}},
			"not enough CPUs on host big: 2 asked, 27 of 28 in use ((8 − 1 reserved) × 4 overcommit)"},
		{"pinned to its volume's host", []Host{host("a", 4, 8192), host("b", 4, 8192)}, map[string]Size{"b": {3, 0}}, Request{Size: Size{1, 512}, Pin: "b"}, "b"},
		{"pinned host full", []Host{host("a", 4, 8192), host("b", 4, 8192)}, map[string]Size{"b": {4, 0}}, Request{Size: Size{1, 512}, Pin: "b"}, "not enough CPUs on host b"},
		{"builder goes to its cache", []Host{host("a", 4, 8192), host("b", 4, 8192)}, map[string]Size{"b": {2, 4096}}, Request{Size: Size{1, 512}, Prefer: "b"}, "b"},
		{"cache host full: elsewhere", []Host{host("a", 4, 8192), host("b", 4, 8192)}, map[string]Size{"b": {4, 0}}, Request{Size: Size{1, 512}, Prefer: "b"}, "a"},
		{"cordoned", []Host{{Name: "a", CPUs: 4, MemoryMiB: 8192, CPURatio: 1, MemRatio: 1, Cordoned: true}}, nil, Request{Size: Size{1, 512}}, "host a is cordoned"},
		{"nothing fits names each host", []Host{host("a", 1, 1024), host("b", 2, 512)}, nil, Request{Size: Size{2, 1000}},
			"nothing fits a request of 2 CPUs and 1000 MiB:\n  not enough CPUs on host a"},
	}
	for _, c := range cases {
		got, err := Place(c.hosts, c.used, c.req)
		if err != nil {
			if !errors.Is(err, errdefs.ErrCapacity) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%s: error %v, want %q", c.name, err, c.want)
			}
			continue
		}
		if got != c.want {
			t.Errorf("%s: placed on %s, want %s", c.name, got, c.want)
		}
	}
}

func TestValidate(t *testing.T) {
	for _, h := range []Host{
		{Name: "h", CPUs: 4, MemoryMiB: 4096, CPURatio: 0.5, MemRatio: 1},
		{Name: "h", CPUs: 4, MemoryMiB: 4096, CPURatio: 100, MemRatio: 1},
		{Name: "h", CPUs: 4, MemoryMiB: 4096, CPURatio: 1, MemRatio: 0},
		{Name: "h", CPUs: 4, MemoryMiB: 4096, CPURatio: 1, MemRatio: 1, ReserveMemoryMiB: 4096},
	} {
		if err := h.Validate(); err == nil || !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%+v: %v", h, err)
		}
	}
}

func TestQueue(t *testing.T) {
	l := NewLedger(host("a", 2, 2048))
	ctx := context.Background()
	if _, err := l.Reserve(ctx, "m1", Request{Size: Size{2, 1024}}, 0, nil); err != nil {
		t.Fatal(err)
	}
	// Nothing fits and the caller will not wait: at once, naming the resource.
	if _, err := l.Reserve(ctx, "m2", Request{Size: Size{1, 512}}, 0, nil); err == nil || !strings.Contains(err.Error(), "not enough CPUs on host a") {
		t.Fatalf("no wait: %v", err)
	}
	// Two wait, in order, with their positions; a release lets the first in.
	got := make(chan string, 2)
	positions := make(chan int, 2)
	for _, id := range []string{"m2", "m3"} {
		go func() {
			_, err := l.Reserve(ctx, id, Request{Size: Size{1, 512}}, 10*time.Second, func(pos int, _ error) { positions <- pos })
			if err != nil {
				got <- id + ": " + err.Error()
				return
			}
			got <- id
		}()
		<-positions
	}
	if l.Position("m2") != 1 || l.Position("m3") != 2 {
		t.Fatalf("positions: %d %d", l.Position("m2"), l.Position("m3"))
	}
	l.Release("m1")
	a, b := <-got, <-got
	if a != "m2" || b != "m3" {
		t.Fatalf("served %q then %q", a, b)
	}
	// A deadline ends the wait with the reason.
	_, err := l.Reserve(ctx, "m4", Request{Size: Size{1, 512}}, 200*time.Millisecond, nil)
	if err == nil || !strings.Contains(err.Error(), "waited 200ms in the capacity queue: not enough CPUs on host a") {
		t.Fatalf("deadline: %v", err)
	}
}
