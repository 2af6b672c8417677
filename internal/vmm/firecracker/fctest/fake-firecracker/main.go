// Command fake-firecracker stands in for the firecracker binary where it cannot run: it
// takes the same flags, serves Firecracker's API on --api-sock with fctest's checks, and
// boots the configured guest under QEMU. It exits when the guest does, as Firecracker
// does. For tests only.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/kilnhq/kiln/internal/vmm/firecracker/fctest"
)

func main() {
	sock := flag.String("api-sock", "/run/firecracker.socket", "API socket path")
	id := flag.String("id", "anonymous-instance", "microVM id")
	flag.Parse()
	ln, err := net.Listen("unix", *sock)
	if err != nil {
		fmt.Fprintf(os.Stderr, "fake-firecracker: %v\n", err)
		os.Exit(1)
	}
	b := &fctest.QEMUBackend{ID: *id, Dir: filepath.Join(filepath.Dir(*sock), "fc-qemu"), Console: os.Stdout}
	api := fctest.NewServer(*id, b)
	api.Log = os.Stderr
	srv := &http.Server{Handler: api}
	go srv.Serve(ln)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-b.Exited():
	case <-sigs:
	}
	ln.Close()
	b.Close()
}
