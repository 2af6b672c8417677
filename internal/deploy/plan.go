// Package deploy turns an app's declared config into running machines: it plans what
// a release changes, machine by machine, and applies the plan on the server with one of
// Fly's strategies, as a durable release that a restart resumes or rolls back.
package deploy

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/appconfig"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/machines"
)

// Metadata keys a deploy puts on its machines, Fly's where Fly has one.
const (
	MetaGroup   = "fly_process_group"
	MetaRelease = "fly_release_version"
	MetaSecrets = machines.MetaSecretsVersion
)

// Spec is what a release deploys: the app's config, the image it runs and how many
// machines each process group has.
type Spec struct {
	Config appconfig.Config `json:"config"`
	Image  string           `json:"image"`
	Counts map[string]int   `json:"counts"`
}

// Change is what a plan does to one machine.
type Change string

const (
	None    Change = "none"
	Update  Change = "update"  // new config in place: the machine restarts on it
	Replace Change = "replace" // a new machine takes its place
	Create  Change = "create"
	Destroy Change = "destroy"
)

// FieldDiff is one changed field of a machine's config, by its JSON path.
type FieldDiff struct {
	Path string `json:"path"`
	Old  string `json:"old,omitempty"`
	New  string `json:"new,omitempty"`
}

// Step is one machine's part of a plan.
type Step struct {
	Group   string      `json:"group"`
	Machine string      `json:"machine,omitempty"` // "" for a machine to create
	Change  Change      `json:"change"`
	Diff    []FieldDiff `json:"diff,omitempty"`
	// Cordoned is a kept machine still out of service (a deploy cut short): it is let
	// back in once healthy.
	Cordoned bool `json:"cordoned,omitempty"`
	// Config is the machine's desired config (what a create, update or replace applies).
	Config api.MachineConfig `json:"-"`
	// VolumeGB is the size of a new volume for each mount, by path.
	VolumeGB map[string]int `json:"-"`
}

// Plan is what a release changes, group by group.
type Plan struct {
	Strategy string `json:"strategy"`
	Steps    []Step `json:"steps"`
}

// Changes counts the plan's steps by change.
func (p Plan) Changes() map[Change]int {
	n := map[Change]int{}
	for _, s := range p.Steps {
		n[s.Change]++
	}
	return n
}

// Existing is a machine of the app as the plan sees it.
type Existing struct {
	ID       string
	Group    string // "" for a machine no deploy made: deploys leave it alone
	Release  int
	Secrets  int
	State    machine.State
	Cordoned bool
	Config   api.MachineConfig
}

// Desired is one group's machine config for a spec and secrets version; Metadata holds
// the group, the release and the secrets version.
func Desired(spec Spec, release, secrets int) (map[string]api.MachineConfig, error) {
	out := map[string]api.MachineConfig{}
	for _, g := range spec.Config.Groups() {
		cfg, err := spec.Config.MachineConfig(g, spec.Image)
		if err != nil {
			return nil, err
		}
		if err := machine.Validate(&cfg); err != nil {
			return nil, fmt.Errorf("process group %s: %w", g, err)
		}
		if cfg.Metadata == nil {
			cfg.Metadata = map[string]string{}
		}
		cfg.Metadata[MetaGroup] = g
		cfg.Metadata[MetaRelease] = strconv.Itoa(release)
		cfg.Metadata[MetaSecrets] = strconv.Itoa(secrets)
		out[g] = cfg
	}
	return out, nil
}

// MakePlan compares each group's desired config and count with the machines that exist.
// Machines whose config already matches are kept first; a destroyed machine is not
// counted. Under bluegreen, every change is a replace.
func MakePlan(strategy string, desired map[string]api.MachineConfig, counts map[string]int, secrets int, existing []Existing) Plan {
	p := Plan{Strategy: strategy}
	byGroup := map[string][]Existing{}
	for _, m := range existing {
		// Deploys manage the machines of their process groups only: not those made by
		// hand, nor a release command's (a deploy of its own waits on it).
		if m.Group == "" || m.Group == appconfig.ReleaseCommandGroup || m.State == machine.Destroyed || m.State == machine.Destroying {
			continue
		}
		byGroup[m.Group] = append(byGroup[m.Group], m)
	}
	groups := slices.Sorted(maps.Keys(desired))
	for _, g := range groups {
		want := desired[g]
		have := byGroup[g]
		// A group the spec gives no count keeps the machines it has (one at least).
		n, given := counts[g]
		if !given {
			n = max(len(have), 1)
		}
		diffs := make([][]FieldDiff, len(have))
		for i, m := range have {
			diffs[i] = Diff(m.Config, want)
			if m.Secrets != secrets {
				diffs[i] = append(diffs[i], FieldDiff{Path: "secrets_version", Old: strconv.Itoa(m.Secrets), New: strconv.Itoa(secrets)})
			}
		}
		// Keep the machines already as wanted first, then running ones; ties keep the
		// older.
		rank := func(i int) int {
			r := 0
			if len(diffs[i]) != 0 {
				r += 2
			}
			if have[i].State != machine.Started {
				r++
			}
			return r
		}
		order := make([]int, len(have))
		for i := range order {
			order[i] = i
		}
		sort.SliceStable(order, func(a, b int) bool { return rank(order[a]) < rank(order[b]) })
		for k, i := range order {
			m := have[i]
			if k >= n {
				p.Steps = append(p.Steps, Step{Group: g, Machine: m.ID, Change: Destroy})
				continue
			}
			st := Step{Group: g, Machine: m.ID, Change: None, Diff: diffs[i], Config: want, Cordoned: m.Cordoned}
			switch {
			case len(diffs[i]) == 0:
			case strategy == "bluegreen" || !slices.EqualFunc(m.Config.Mounts, want.Mounts, sameMount):
				st.Change = Replace
			default:
				st.Change = Update
				// Updated in place, it keeps its own volumes (a deploy names each
				// machine's, source or source_N).
				st.Config.Mounts = m.Config.Mounts
			}
			p.Steps = append(p.Steps, st)
		}
		for k := len(have); k < n; k++ {
			p.Steps = append(p.Steps, Step{Group: g, Change: Create, Config: want})
		}
	}
	// Groups the config no longer has lose their machines.
	for _, g := range slices.Sorted(maps.Keys(byGroup)) {
		if _, ok := desired[g]; !ok {
			for _, m := range byGroup[g] {
				p.Steps = append(p.Steps, Step{Group: g, Machine: m.ID, Change: Destroy})
			}
		}
	}
	return p
}

// sameMount compares mounts by path and volume name: a deploy gives each machine its
// own volume of the mount's source, so IDs differ between machines.
func sameMount(a, b api.Mount) bool {
	return a.Path == b.Path && VolumeFamily(a.Volume) == VolumeFamily(b.Volume)
}

// VolumeFamily is a volume's name without the _N suffix a deploy adds to the second
// and later volumes of a source.
func VolumeFamily(name string) string {
	if i := strings.LastIndexByte(name, '_'); i > 0 {
		if _, err := strconv.Atoi(name[i+1:]); err == nil {
			return name[:i]
		}
	}
	return name
}

// ignored are the config paths a plan does not compare: the release a machine was made
// by changes with every deploy, and mounts are compared by sameMount.
var ignored = []string{"metadata." + MetaRelease, "metadata." + MetaSecrets, "mounts"}

// Diff lists the fields that differ between two machine configs, by JSON path, sorted.
func Diff(old, new api.MachineConfig) []FieldDiff {
	a, b := flatten(old), flatten(new)
	var out []FieldDiff
	for _, k := range slices.Sorted(maps.Keys(mergeKeys(a, b))) {
		if skip(k) {
			continue
		}
		if a[k] != b[k] {
			out = append(out, FieldDiff{Path: k, Old: a[k], New: b[k]})
		}
	}
	if !slices.EqualFunc(old.Mounts, new.Mounts, sameMount) {
		out = append(out, FieldDiff{Path: "mounts", Old: mountsText(old.Mounts), New: mountsText(new.Mounts)})
	}
	return out
}

func skip(path string) bool {
	for _, p := range ignored {
		if path == p || strings.HasPrefix(path, p+".") || strings.HasPrefix(path, p+"[") {
			return true
		}
	}
	return false
}

func mountsText(ms []api.Mount) string {
	var s []string
	for _, m := range ms {
		s = append(s, VolumeFamily(m.Volume)+":"+m.Path)
	}
	return strings.Join(s, ",")
}

func mergeKeys(a, b map[string]string) map[string]bool {
	out := map[string]bool{}
	for k := range a {
		out[k] = true
	}
	for k := range b {
		out[k] = true
	}
	return out
}

// flatten maps a config's JSON to path → value, with empty values left out so that an
// absent field and its zero value compare equal.
func flatten(cfg api.MachineConfig) map[string]string {
	raw, _ := json.Marshal(cfg)
	var v any
	json.Unmarshal(raw, &v)
	out := map[string]string{}
	var walk func(prefix string, v any)
	walk = func(prefix string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				p := k
				if prefix != "" {
					p = prefix + "." + k
				}
				walk(p, x)
			}
		case []any:
			for i, x := range v {
				walk(fmt.Sprintf("%s[%d]", prefix, i), x)
			}
		case nil:
		case string:
			if v != "" {
				out[prefix] = strconv.Quote(v)
			}
		case bool:
			if v {
				out[prefix] = "true"
			}
		case float64:
			if v != 0 {
				out[prefix] = strconv.FormatFloat(v, 'f', -1, 64)
			}
		}
	}
	walk("", v)
	return out
}
