// Package errdefs holds the error kinds every kiln package classifies its errors by.
// Callers test kinds with errors.Is; the CLI and API map kinds to exit and status codes
// in one place each (the API's is HTTPStatus and KindOfStatus, used by the server and
// the client alike). Messages stay with the wrapping error, never in the kind.
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

// kindError attaches a kind (and maybe a cause) to a message without changing the
// message.
type kindError struct {
	kind  error
	cause error
	msg   string
}

func (e *kindError) Error() string { return e.msg }

// Unwrap gives errors.Is and errors.As both the kind and the cause.
func (e *kindError) Unwrap() []error {
	if e.cause == nil {
		return []error{e.kind}
	}
	return []error{e.kind, e.cause}
}

// New returns an error of kind with a formatted message. The message should say what
// failed and what to do about it. An error among args is only printed: use Wrap to keep
// it as the cause.
func New(kind error, format string, args ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

// Wrap returns an error of kind whose message is the formatted text, ": ", and cause's
// message; errors.Is and errors.As see through it to cause (so an ErrNotFound or a
// context.Canceled beneath stays visible). A nil cause gives nil.
func Wrap(kind, cause error, format string, args ...any) error {
	if cause == nil {
		return nil
	}
	return &kindError{kind: kind, cause: cause, msg: fmt.Sprintf(format, args...) + ": " + cause.Error()}
}

// Invalid is shorthand for New(ErrInvalid, ...).
func Invalid(format string, args ...any) error { return New(ErrInvalid, format, args...) }

// Missing reports an absent host dependency, naming the Debian package that provides it.
func Missing(what, pkg string) error {
	return New(ErrMissingDependency, "%s not found: install the Debian package %s (run `make setup`)", what, pkg)
}

var (
	// ErrTimeout: a wait the caller bounded ran out before the thing happened.
	ErrTimeout = errors.New("timeout")
	// ErrNotImplemented: kiln does not do this (yet, or in this configuration).
	ErrNotImplemented = errors.New("not implemented")
	// ErrUnauthenticated: the call carries no token kiln accepts (none, altered,
	// expired or revoked).
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrForbidden: the token reaches the thing but its role does not allow the call.
	ErrForbidden = errors.New("forbidden")
)

// Kinds lists every kind, most specific first.
var Kinds = []error{ErrInvalid, ErrNotFound, ErrConflict, ErrTimeout, ErrCapacity, ErrUnavailable,
	ErrProtocol, ErrNotImplemented, ErrMissingDependency, ErrUnauthenticated, ErrForbidden}

// KindOf is err's kind: the kind of the outermost classified error in its chain (a
// Wrap's own kind, not its cause's), or nil if none is classified.
func KindOf(err error) error {
	var ke *kindError
	if errors.As(err, &ke) {
		return ke.kind
	}
	for _, k := range Kinds {
		if errors.Is(err, k) {
			return k
		}
	}
	return nil
}

// statuses is the one table between kinds and HTTP statuses. The server writes a kind's
// status; the client reads a status back into the first kind listed for it.
var statuses = []struct {
	kind   error
	status int
}{
	{ErrInvalid, 400},
	{ErrUnauthenticated, 401},
	{ErrForbidden, 403},
	{ErrNotFound, 404},
	{ErrTimeout, 408},
	{ErrConflict, 409},
	{ErrCapacity, 507},
	{ErrUnavailable, 503},
	{ErrNotImplemented, 501},
	{ErrMissingDependency, 501},
	{ErrProtocol, 502},
}

// HTTPStatus is the status the API answers err with: its kind's, else 500.
func HTTPStatus(err error) int {
	k := KindOf(err)
	for _, s := range statuses {
		if s.kind == k {
			return s.status
		}
	}
	return 500
}

// FlyStatus is the word Fly's API puts beside an error's message for clients that
// branch on it: insufficient_capacity for a capacity error, unknown for the rest.
func FlyStatus(err error) string {
	if KindOf(err) == ErrCapacity {
		return "insufficient_capacity"
	}
	return "unknown"
}

// KindOfStatus is the kind an API status stands for; nil for statuses no kind has
// (2xx, 500 and the like).
func KindOfStatus(status int) error {
	for _, s := range statuses {
		if s.status == status {
			return s.kind
		}
	}
	return nil
}
