package appconfig

import (
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// This file holds the value forms Fly accepts in more than one shape: each type reads
// every shape and keeps one, so that a Config always says the same thing the same way.

// Duration is a check's duration as a Go duration string ("10s"). In the file it may
// also be an integer of milliseconds, as Fly reads check durations.
type Duration string

// UnmarshalTOML takes a string or a number of milliseconds.
func (d *Duration) UnmarshalTOML(v any) error {
	s, err := durationValue(v, time.Millisecond, "milliseconds")
	*d = Duration(s)
	return err
}

// durationValue reads a duration given as a string or as a number of unit.
func durationValue(v any, unit time.Duration, unitName string) (string, error) {
	switch v := v.(type) {
	case string:
		return v, nil
	case int64:
		return (time.Duration(v) * unit).String(), nil
	case float64:
		return time.Duration(v * float64(unit)).String(), nil
	}
	return "", fmt.Errorf("want a duration like \"10s\" or a number of %s, not %v", unitName, v)
}

// parseDuration checks a duration string; zero is allowed.
func parseDuration(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%q: want a duration like \"10s\" or \"5m\"", s)
	}
	return d, nil
}

// Autostop is what the proxy does with an idle machine: "off", "stop" or "suspend".
// In the file it may also be a boolean: true means stop, false off.
type Autostop string

// UnmarshalTOML takes a boolean or a word.
func (a *Autostop) UnmarshalTOML(v any) error {
	switch v := v.(type) {
	case bool:
		*a = map[bool]Autostop{true: "stop", false: "off"}[v]
	case string:
		*a = Autostop(v)
	default:
		return fmt.Errorf("want true, false, \"off\", \"stop\" or \"suspend\", not %v", v)
	}
	return nil
}

// Size is a size as written ("10gb", "512mb"); in the file it may also be a bare
// integer, whose unit depends on the key (MB for memory, GB for volumes), as Fly reads it.
type Size string

// UnmarshalTOML takes a string or an integer.
func (s *Size) UnmarshalTOML(v any) error {
	switch v := v.(type) {
	case string:
		*s = Size(v)
	case int64:
		*s = Size(strconv.FormatInt(v, 10))
	default:
		return fmt.Errorf("want a size like \"1gb\" or a whole number, not %v", v)
	}
	return nil
}

var sizeRE = regexp.MustCompile(`^(\d+(?:\.\d+)?) ?([kKmMgGtTpP])?[iI]?[bB]?$`)

// in reads a size in units of unit bytes (rounded down), as Fly's flyctl does: a bare
// integer is already in unit; suffixes are powers of base (1024 for memory, 1000 for
// volumes, as Docker's units package reads them).
func (s Size) in(unit, base float64) (int, error) {
	if n, err := strconv.Atoi(string(s)); err == nil {
		return n, nil
	}
	m := sizeRE.FindStringSubmatch(string(s))
	if m == nil {
		return 0, fmt.Errorf("%q: want a size like \"512mb\" or \"1gb\"", string(s))
	}
	n, _ := strconv.ParseFloat(m[1], 64)
	if m[2] != "" {
		n *= math.Pow(base, float64(strings.Index("kmgtp", strings.ToLower(m[2]))+1))
	}
	return int(n / unit), nil
}

// MB reads a memory size in MiB.
func (s Size) MB() (int, error) { return s.in(1<<20, 1024) }

// GB reads a volume size in GB.
func (s Size) GB() (int, error) { return s.in(1e9, 1000) }

// Words is a command as a list; in the file it may also be one string, which is one
// word, as Fly reads [experimental] cmd, entrypoint and exec.
type Words []string

// UnmarshalTOML takes a string or a list of strings.
func (w *Words) UnmarshalTOML(v any) error {
	switch v := v.(type) {
	case string:
		*w = Words{v}
		return nil
	case []any:
		out := make(Words, 0, len(v))
		for _, x := range v {
			s, ok := x.(string)
			if !ok {
				return fmt.Errorf("want a list of strings, not %v", v)
			}
			out = append(out, s)
		}
		*w = out
		return nil
	}
	return fmt.Errorf("want a string or a list of strings, not %v", v)
}
