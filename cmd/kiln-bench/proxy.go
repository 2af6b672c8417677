package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/machine"
	"github.com/kilnhq/kiln/internal/proxy"
)

// oneMachine is a started machine whose service is a local HTTP server: the benchmark
// measures the proxy's own cost, not the VM's network under emulation.
type oneMachine struct{ t proxy.Target }

func (o oneMachine) Targets(context.Context) ([]proxy.Target, error) { return []proxy.Target{o.t}, nil }
func (oneMachine) Start(context.Context, string) error               { return nil }
func (oneMachine) Stop(context.Context, string) error                { return nil }
func (oneMachine) Suspend(context.Context, string) error             { return nil }

// benchProxy times sequential keep-alive requests to a local server, directly and
// through the proxy (Host routing, lease, reverse proxy).
func benchProxy(ctx context.Context, add func(string, float64, string, string)) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	backend := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })}
	go backend.Serve(ln)
	defer backend.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	svc := api.Service{Protocol: "tcp", InternalPort: port, Ports: []api.ServicePort{{Port: 80, Handlers: []string{"http"}}}}
	px := proxy.New(oneMachine{proxy.Target{ID: "bench", App: "bench", State: machine.Started,
		Addr: netip.MustParseAddr("127.0.0.1"), Services: []api.Service{svc}}}, proxy.Config{HTTPAddr: "127.0.0.1:0", IdleTimeout: time.Hour})
	if err := px.Listen(); err != nil {
		return err
	}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go px.Run(pctx)
	time.Sleep(300 * time.Millisecond)

	const n = 3000
	timeRequests := func(url string) ([]time.Duration, error) {
		cl := &http.Client{Transport: &http.Transport{}}
		defer cl.CloseIdleConnections()
		var ds []time.Duration
		for i := 0; i < n+100; i++ {
			req, _ := http.NewRequest("GET", url, nil)
			req.Host = "bench.kiln.internal"
			start := time.Now()
			resp, err := cl.Do(req)
			if err != nil {
				return nil, err
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				return nil, fmt.Errorf("%s answered %s", url, resp.Status)
			}
			if i >= 100 { // warm-up
				ds = append(ds, time.Since(start))
			}
		}
		return ds, nil
	}
	direct, err := timeRequests("http://" + ln.Addr().String() + "/")
	if err != nil {
		return err
	}
	proxied, err := timeRequests("http://" + px.Addr() + "/")
	if err != nil {
		return err
	}
	for _, p := range []struct {
		name string
		q    float64
	}{{"p50", 0.50}, {"p99", 0.99}} {
		d, x := pct(direct, p.q), pct(proxied, p.q)
		add("proxy_request_"+p.name, us(x), "µs", fmt.Sprintf("direct %.0f µs; overhead %.0f µs (%d keep-alive requests, local backend)", us(d), us(x-d), n))
	}
	return nil
}
