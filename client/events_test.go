package client_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/client"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// A follow whose connection drops (the server restarts, a proxy cuts it) connects
// again, resuming after the last event it passed on, so that nothing is seen twice or
// missed; a server's refusal ends it with the server's error.
func TestFollowEventsResumesAfterADrop(t *testing.T) {
	var mu sync.Mutex
	var asked []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		mu.Lock()
		asked = append(asked, q.Get("app")+" after="+q.Get("after"))
		mu.Unlock()
		if q.Get("app") == "other" {
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"error":"app other not found"}`)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		send := func(id int) {
			fmt.Fprintf(w, "id: %d\nevent: machine.start\ndata: {\"id\":%d,\"type\":\"machine.start\",\"app\":\"web\"}\n\n", id, id)
		}
		switch q.Get("after") {
		case "": // the first connection: two events and a keepalive, then it drops
			send(1)
			fmt.Fprint(w, ": keepalive\n\n")
			send(2)
		case "2":
			send(3)
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		}
	}))
	defer srv.Close()
	cl := client.New(srv.URL, "t")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var got []int64
	var drops []error
	err := cl.FollowEvents(ctx, client.EventQuery{App: "web"}, func(e api.StreamEvent) error {
		got = append(got, e.ID)
		if len(got) == 3 {
			cancel()
		}
		return nil
	}, func(err error) { drops = append(drops, err) })
	if err != nil || fmt.Sprint(got) != "[1 2 3]" || len(drops) != 1 {
		t.Errorf("followed %v, dropped %v: %v", got, drops, err)
	}
	if fmt.Sprint(asked) != "[web after= web after=2]" {
		t.Errorf("the server was asked %q", asked)
	}

	err = cl.FollowEvents(t.Context(), client.EventQuery{App: "other"}, func(api.StreamEvent) error { return nil }, nil)
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "app other not found") {
		t.Errorf("a refused follow: %v", err)
	}
	stop := errors.New("enough")
	err = cl.FollowEvents(t.Context(), client.EventQuery{App: "web"}, func(api.StreamEvent) error { return stop }, nil)
	if !errors.Is(err, stop) {
		t.Errorf("a follow whose callback fails: %v", err)
	}
}
