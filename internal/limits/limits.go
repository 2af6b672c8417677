// Package limits is the one registry of the limits kiln enforces. Code that enforces a
// limit registers it here with its value and where that value came from, so that
// `kiln limits show` (GET /v1/limits) lists every limit and nothing else: there are no
// hidden ones. A test holds the registry to the code that enforces limits.
package limits

import (
	"fmt"
	"sort"
	"sync"
)

// Limit is one enforced limit.
type Limit struct {
	Name        string `json:"name"`
	Value       string `json:"value"`
	Unit        string `json:"unit,omitempty"`
	Source      string `json:"source"` // default, flag --x, env X, config file
	Description string `json:"description"`
}

// Registry holds the limits of one kiln process.
type Registry struct {
	mu sync.Mutex
	m  map[string]Limit
}

// Default is the process's registry.
var Default = &Registry{}

// Set records a limit; a later Set of the same name replaces it.
func (r *Registry) Set(name string, value any, unit, source, description string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[string]Limit{}
	}
	r.m[name] = Limit{Name: name, Value: fmt.Sprint(value), Unit: unit, Source: source, Description: description}
}

// All lists the limits by name.
func (r *Registry) All() []Limit {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Limit, 0, len(r.m))
	for _, l := range r.m {
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Get returns a limit by name.
func (r *Registry) Get(name string) (Limit, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	l, ok := r.m[name]
	return l, ok
}
