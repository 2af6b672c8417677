package client_test

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// A server's error status reads back into the kind the server answered it for, through
// the same table, so errors.Is works on a remote error as on a local one.
func TestStatusesReadBackToKinds(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The app's name is the status to answer: /v1/apps/s507/machines.
		code, _ := strconv.Atoi(strings.TrimPrefix(strings.Split(r.URL.Path, "/")[3], "s"))
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		w.Write([]byte(`{"error":"what went wrong"}`))
	}))
	defer srv.Close()
	cl := client.New(srv.URL, "t")
	get := func(status int) error {
		_, err := cl.ListMachines(t.Context(), "s"+strconv.Itoa(status))
		return err
	}
	for _, c := range []struct {
		status int
		kind   error
	}{
		{400, errdefs.ErrInvalid},
		{401, errdefs.ErrUnauthenticated},
		{403, errdefs.ErrForbidden},
		{404, errdefs.ErrNotFound},
		{408, errdefs.ErrTimeout},
		{409, errdefs.ErrConflict},
		{501, errdefs.ErrNotImplemented},
		{502, errdefs.ErrProtocol},
		{503, errdefs.ErrUnavailable},
		{507, errdefs.ErrCapacity},
	} {
		err := get(c.status)
		if !errors.Is(err, c.kind) || errdefs.KindOf(err) != c.kind || err.Error() != "what went wrong" {
			t.Errorf("%d: %v (kind %v), want %v with the server's message", c.status, err, errdefs.KindOf(err), c.kind)
		}
	}
	// Every kind makes the round trip to its status and back.
	for _, k := range errdefs.Kinds {
		st := errdefs.HTTPStatus(errdefs.New(k, "x"))
		if back := errdefs.HTTPStatus(get(st)); back != st {
			t.Errorf("%v: answered %d, reads back as a kind answered %d", k, st, back)
		}
	}
	for _, st := range []int{500} {
		if err := get(st); err == nil || errdefs.KindOf(err) != nil {
			t.Errorf("%d: %v has kind %v, want none", st, err, errdefs.KindOf(err))
		}
	}
}

// A server that cannot be reached is unavailable, and the message keeps the cause.
func TestUnreachableServer(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	_, err := client.New(url, "t").ListApps(t.Context())
	var op interface{ Timeout() bool }
	if !errors.Is(err, errdefs.ErrUnavailable) || !errors.As(err, &op) {
		t.Fatalf("%v: want unavailable with the dial error beneath", err)
	}
}
