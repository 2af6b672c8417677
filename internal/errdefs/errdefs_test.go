package errdefs

import (
	"context"
	"errors"
	"fmt"
	"testing"
)

func TestWrapKeepsKindAndCause(t *testing.T) {
	cause := fmt.Errorf("reading: %w", context.Canceled)
	err := Wrap(ErrInvalid, cause, "config %s", "x")
	if err.Error() != "config x: reading: context canceled" {
		t.Fatalf("message %q", err)
	}
	if !errors.Is(err, ErrInvalid) || !errors.Is(err, context.Canceled) {
		t.Fatalf("errors.Is lost the kind or the cause: %v", err)
	}
	if Wrap(ErrInvalid, nil, "x") != nil {
		t.Fatal("Wrap of nil is not nil")
	}
}

func TestKindOfIsTheOutermost(t *testing.T) {
	inner := New(ErrNotFound, "volume v not found")
	outer := Wrap(ErrConflict, inner, "attaching")
	if KindOf(outer) != ErrConflict {
		t.Fatalf("KindOf = %v, want conflict", KindOf(outer))
	}
	if KindOf(fmt.Errorf("ctx: %w", inner)) != ErrNotFound {
		t.Fatal("KindOf lost a kind under fmt.Errorf")
	}
	if KindOf(errors.New("plain")) != nil {
		t.Fatal("a plain error has a kind")
	}
}

func TestStatusTableRoundTrips(t *testing.T) {
	for _, k := range Kinds {
		st := HTTPStatus(New(k, "x"))
		if st == 500 {
			t.Errorf("kind %v has no status", k)
			continue
		}
		back := KindOfStatus(st)
		// Kinds sharing a status come back as the first listed for it.
		if HTTPStatus(New(back, "x")) != st {
			t.Errorf("kind %v: status %d reads back as %v", k, st, back)
		}
	}
	if HTTPStatus(errors.New("plain")) != 500 || KindOfStatus(200) != nil {
		t.Fatal("unclassified errors or 2xx have a kind")
	}
	if KindOfStatus(507) != ErrCapacity || KindOfStatus(501) != ErrNotImplemented {
		t.Fatal("507 or 501 does not read back")
	}
}
