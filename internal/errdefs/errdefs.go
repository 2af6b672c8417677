// Package errdefs holds the error kinds every kiln package classifies its errors by.
// Callers test kinds with errors.Is; the CLI and API map kinds to exit and status codes
// in one place each. Messages stay with the wrapping error, never in the kind.
package errdefs

import (
	"errors"
	"fmt"
)

var (
	// ErrInvalid: the caller asked for something malformed or out of range.
	ErrInvalid = errors.New("invalid argument")
	// ErrNotFound: the named thing does not exist.
	ErrNotFound = errors.New("not found")
	// ErrConflict: the thing exists but is in a state that forbids the request
	// (a disk attached elsewhere, a VM already started).
	ErrConflict = errors.New("conflict")
	// ErrCapacity: the host lacks the resources asked for.
	ErrCapacity = errors.New("insufficient capacity")
	// ErrMissingDependency: a host tool or asset kiln needs is absent; the message names
	// the package and the command that installs it.
	ErrMissingDependency = errors.New("missing dependency")
	// ErrUnavailable: the VM or its agent went away while a call was in flight.
	ErrUnavailable = errors.New("unavailable")
	// ErrProtocol: host and guest do not speak the same agent protocol.
	ErrProtocol = errors.New("protocol mismatch")
)

// kindError attaches a kind to a message without changing the message.
type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.kind }

// New returns an error of kind with a formatted message. The message should say what
// failed and what to do about it.
func New(kind error, format string, args ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

// Invalid is shorthand for New(ErrInvalid, ...).
func Invalid(format string, args ...any) error { return New(ErrInvalid, format, args...) }

// Missing reports an absent host dependency, naming the Debian package that provides it.
func Missing(what, pkg string) error {
	return New(ErrMissingDependency, "%s not found: install the Debian package %s (run `make setup`)", what, pkg)
}
