package main

import (
	"context"
	"fmt"
	"testing"

	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// A failure exits with the same status whether it happened in the CLI or on the server
// and came back through the API, for every kind. No VM, no server.
func TestExitCodeSameLocalAndRemote(t *testing.T) {
	for _, k := range errdefs.Kinds {
		local := errdefs.New(k, "x")
		remote := fmt.Errorf("loading f.tar: %w", &client.Error{Status: errdefs.HTTPStatus(local), Message: "x"})
		if l, r := exitCode(local), exitCode(remote); l != r {
			t.Errorf("%v: exit %d here, %d from the server", k, l, r)
		}
	}
	for _, c := range []struct {
		err  error
		want int
	}{
		{errdefs.Invalid("bad flag"), 2},
		{errdefs.Missing("qemu-img", "qemu-utils"), 2},
		{&client.Error{Status: 501, Message: "qemu-img not found"}, 2},
		{&client.Error{Status: 507, Message: "no memory"}, 1},
		{&client.Error{Status: 401, Message: "wrong token"}, 1},
		{errdefs.Wrap(errdefs.ErrUnavailable, context.Canceled, "cannot reach the kiln server"), 130},
	} {
		if got := exitCode(c.err); got != c.want {
			t.Errorf("%v: exit %d, want %d", c.err, got, c.want)
		}
	}
}
