// Package capacity is kiln's capacity model: what a host offers (CPUs and memory with
// operator-set overcommit ratios, less a reserve for the host itself), what machines and
// builders hold, where a new one fits, and a queue for requests that fit nowhere yet.
// Every refusal names the resource and the numbers.
package capacity

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// Host is what one host offers.
type Host struct {
	Name      string  `json:"name"`
	CPUs      int     `json:"cpus"`
	MemoryMiB int     `json:"memory_mib"`
	CPURatio  float64 `json:"cpu_overcommit"`
	MemRatio  float64 `json:"memory_overcommit"`
	// The reserve is kept for the host itself and never offered.
	ReserveCPUs      int  `json:"reserve_cpus"`
	ReserveMemoryMiB int  `json:"reserve_memory_mib"`
	Cordoned         bool `json:"cordoned,omitempty"`
}

// Bounds on overcommit ratios: below 1 would hide capacity, above these is more than
// any workload bursts to.
const (
	MaxCPURatio = 16
	MaxMemRatio = 4
)

// Validate checks what an operator set.
func (h Host) Validate() error {
	switch {
	case h.CPURatio < 1 || h.CPURatio > MaxCPURatio:
		return errdefs.Invalid("CPU overcommit %.2f for host %s is out of range: use 1 (none) to %d", h.CPURatio, h.Name, MaxCPURatio)
	case h.MemRatio < 1 || h.MemRatio > MaxMemRatio:
		return errdefs.Invalid("memory overcommit %.2f for host %s is out of range: use 1 (none) to %d; guests do not give memory back", h.MemRatio, h.Name, MaxMemRatio)
	case h.ReserveCPUs < 0 || h.ReserveCPUs >= h.CPUs:
		return errdefs.Invalid("CPU reserve %d for host %s must be at least 0 and below its %d CPUs", h.ReserveCPUs, h.Name, h.CPUs)
	case h.ReserveMemoryMiB < 0 || h.ReserveMemoryMiB >= h.MemoryMiB:
		return errdefs.Invalid("memory reserve %d MiB for host %s must be at least 0 and below its %d MiB", h.ReserveMemoryMiB, h.Name, h.MemoryMiB)
	}
	return nil
}

// AllowedCPUs is what the host offers in vCPUs: (CPUs − reserve) × ratio.
func (h Host) AllowedCPUs() int { return int(float64(h.CPUs-h.ReserveCPUs) * h.CPURatio) }

// AllowedMemoryMiB is what the host offers in MiB: (memory − reserve) × ratio.
func (h Host) AllowedMemoryMiB() int {
	return int(float64(h.MemoryMiB-h.ReserveMemoryMiB) * h.MemRatio)
}

// Size is what one machine or builder holds while it runs.
type Size struct {
	CPUs      int `json:"cpus"`
	MemoryMiB int `json:"memory_mib"`
}

// Request asks for room.
type Request struct {
	Size
	// Pin, if set, is the only host that may take it (a volume lives there).
	Pin string
	// Prefer, if set and it fits, is taken first (a builder's cache lives there).
	Prefer string
}

// Fit says whether size fits on h beside used, and if not, which resource is short,
// with the numbers.
func Fit(h Host, used Size, s Size) error {
	switch refusal(h, used, s) {
	case refusedCordoned:
		return errdefs.New(errdefs.ErrCapacity, "host %s is cordoned: it takes no new work", h.Name)
	case refusedMemory:
		return errdefs.New(errdefs.ErrCapacity, "not enough memory on host %s: %d MiB asked, %d of %d MiB in use ((%d MiB − %d reserved) × %.2g overcommit)",
			h.Name, s.MemoryMiB, used.MemoryMiB, h.AllowedMemoryMiB(), h.MemoryMiB, h.ReserveMemoryMiB, h.MemRatio)
	case refusedCPUs:
		return errdefs.New(errdefs.ErrCapacity, "not enough CPUs on host %s: %d asked, %d of %d in use ((%d − %d reserved) × %.2g overcommit)",
			h.Name, s.CPUs, used.CPUs, h.AllowedCPUs(), h.CPUs, h.ReserveCPUs, h.CPURatio)
	}
	return nil
}

// Why a host refuses a request; the rule is here alone, and Fit words it.
const (
	fits = iota
	refusedCordoned
	refusedMemory
	refusedCPUs
)

func refusal(h Host, used Size, s Size) int {
	switch {
	case h.Cordoned:
		return refusedCordoned
	case used.MemoryMiB+s.MemoryMiB > h.AllowedMemoryMiB():
		return refusedMemory
	case used.CPUs+s.CPUs > h.AllowedCPUs():
		return refusedCPUs
	}
	return fits
}

// Place picks a host: the pinned one, else the preferred one if it fits, else the fitting
// host with the most free memory (machines spread). With none, the error says why each
// host refused.
func Place(hosts []Host, used map[string]Size, r Request) (string, error) {
	if r.Pin != "" {
		for _, h := range hosts {
			if h.Name == r.Pin {
				return h.Name, Fit(h, used[h.Name], r.Size)
			}
		}
		return "", errdefs.New(errdefs.ErrCapacity, "host %s, where the request is pinned (its volume lives there), is not available", r.Pin)
	}
	best, bestFree := "", -1
	for _, h := range hosts {
		u := used[h.Name]
		if refusal(h, u, r.Size) != fits {
			continue
		}
		if h.Name == r.Prefer {
			return h.Name, nil
		}
		if free := h.AllowedMemoryMiB() - u.MemoryMiB; free > bestFree || (free == bestFree && h.Name < best) {
			best, bestFree = h.Name, free
		}
	}
	if best != "" {
		return best, nil
	}
	// Nothing fits: only now is each host's refusal worded.
	var reasons []string
	for _, h := range hosts {
		reasons = append(reasons, Fit(h, used[h.Name], r.Size).Error())
	}
	if len(reasons) == 0 {
		return "", errdefs.New(errdefs.ErrCapacity, "no host is available")
	}
	if len(reasons) == 1 {
		return "", errdefs.New(errdefs.ErrCapacity, "%s", reasons[0])
	}
	sort.Strings(reasons)
	msg := "nothing fits a request of " + fmt.Sprintf("%d CPUs and %d MiB", r.CPUs, r.MemoryMiB) + ":"
	for _, s := range reasons {
		msg += "\n  " + s
	}
	return "", errdefs.New(errdefs.ErrCapacity, "%s", msg)
}

// Ledger tracks what runs on a set of hosts and queues requests that do not fit yet.
type Ledger struct {
	mu      sync.Mutex
	hosts   []Host
	holds   map[string]hold // holder ID → where and how much
	queue   []*waiter
	changed chan struct{}
}

type hold struct {
	host string
	size Size
}

type waiter struct{ id string }

// NewLedger returns a ledger over hosts.
func NewLedger(hosts ...Host) *Ledger {
	return &Ledger{hosts: hosts, holds: map[string]hold{}, changed: make(chan struct{})}
}

// Hosts returns the hosts with what they hold.
func (l *Ledger) Hosts() ([]Host, map[string]Size) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Host(nil), l.hosts...), l.usedLocked()
}

func (l *Ledger) usedLocked() map[string]Size {
	used := map[string]Size{}
	for _, h := range l.holds {
		u := used[h.host]
		u.CPUs += h.size.CPUs
		u.MemoryMiB += h.size.MemoryMiB
		used[h.host] = u
	}
	return used
}

// SetCordoned cordons or uncordons a host: a cordoned host takes nothing new.
func (l *Ledger) SetCordoned(name string, c bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := range l.hosts {
		if l.hosts[i].Name == name {
			l.hosts[i].Cordoned = c
			l.broadcast()
			return nil
		}
	}
	return errdefs.New(errdefs.ErrNotFound, "no host %s", name)
}

// Cordoned says whether a host is cordoned.
func (l *Ledger) Cordoned(name string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, h := range l.hosts {
		if h.Name == name {
			return h.Cordoned
		}
	}
	return false
}

func (l *Ledger) broadcast() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// Position is id's place in the queue (1 = next), or 0 if it is not waiting.
func (l *Ledger) Position(id string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, w := range l.queue {
		if w.id == id {
			return i + 1
		}
	}
	return 0
}

// Queued is how many requests wait in the queue now.
func (l *Ledger) Queued() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.queue)
}

// Reserve holds room for id, waiting in the queue up to wait (0: fail at once) when
// nothing fits. Requests are served in order: one that fits does not jump the queue.
// onQueued, if set, is told the position when the request starts waiting. A second
// Reserve for the same id replaces its hold.
func (l *Ledger) Reserve(ctx context.Context, id string, r Request, wait time.Duration, onQueued func(pos int, why error)) (string, error) {
	l.mu.Lock()
	if _, ok := l.holds[id]; ok {
		delete(l.holds, id)
		l.broadcast() // the room it held may be what a waiter needs
	}
	host, err := l.tryLocked(id, r)
	if err == nil || wait <= 0 {
		l.mu.Unlock()
		return host, err
	}
	w := &waiter{id: id}
	l.queue = append(l.queue, w)
	pos := len(l.queue)
	l.mu.Unlock()
	if onQueued != nil {
		onQueued(pos, err)
	}
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	defer l.leave(w)
	for {
		l.mu.Lock()
		if len(l.queue) > 0 && l.queue[0] == w {
			if host, err2 := l.tryLocked(id, r); err2 == nil {
				l.mu.Unlock()
				return host, nil
			} else {
				err = err2
			}
		}
		changed := l.changed
		l.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return "", ctx.Err()
		case <-deadline.C:
			return "", errdefs.Wrap(errdefs.ErrCapacity, err, "waited %s in the capacity queue", wait)
		}
	}
}

// tryLocked places r and holds the room if it fits; with others queued, only the head
// of the queue may take room.
func (l *Ledger) tryLocked(id string, r Request) (string, error) {
	if len(l.queue) > 0 && l.queue[0].id != id {
		return "", errdefs.New(errdefs.ErrCapacity, "%d requests wait for capacity ahead of this one", len(l.queue))
	}
	host, err := Place(l.hosts, l.usedLocked(), r)
	if err != nil {
		return "", err
	}
	l.holds[id] = hold{host: host, size: r.Size}
	return host, nil
}

func (l *Ledger) leave(w *waiter) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, x := range l.queue {
		if x == w {
			l.queue = append(l.queue[:i], l.queue[i+1:]...)
			break
		}
	}
	l.broadcast()
}

// CanEverFit refuses a size no host could take even empty: waiting would not help.
func (l *Ledger) CanEverFit(s Size) error {
	l.mu.Lock()
	hosts := append([]Host(nil), l.hosts...)
	l.mu.Unlock()
	for i := range hosts {
		hosts[i].Cordoned = false
	}
	_, err := Place(hosts, nil, Request{Size: s})
	return err
}

// Hold records room id already holds on the first host (a VM adopted after a restart),
// whether or not it fits the ledger's numbers now.
func (l *Ledger) Hold(id string, s Size) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.hosts) > 0 {
		l.holds[id] = hold{host: l.hosts[0].Name, size: s}
	}
}

// Release gives back id's room.
func (l *Ledger) Release(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.holds[id]; ok {
		delete(l.holds, id)
		l.broadcast()
	}
}
