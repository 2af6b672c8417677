// Command fake-firecracker stands in for the firecracker binary where it cannot run: it
// takes the same flags, serves Firecracker's API on --api-sock with fctest's checks, and
// boots the configured guest under QEMU. It exits when the guest does, as Firecracker
// does. For tests only.
//
// Called with the jailer's flags (--exec-file and the rest, then "--" and Firecracker's
// own), it stands in for the jailer and the Firecracker it execs: it makes the jail as the
// jailer does, serves the API socket inside it, holds every path the API is given to the
// jail (fctest.Jail), and runs QEMU as the jail's user.
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

	"github.com/kilnhq/kiln/internal/vmm"
	"github.com/kilnhq/kiln/internal/vmm/firecracker/fctest"
)

func fail(err error) {
	fmt.Fprintf(os.Stderr, "fake-firecracker: %v\n", err)
	os.Exit(1)
}

func main() {
	jailer := flag.NewFlagSet("jailer", flag.ExitOnError)
	execFile := jailer.String("exec-file", "", "the firecracker binary (jailer)")
	jid := jailer.String("id", "", "microVM id (jailer)")
	uid := jailer.Int("uid", -1, "user to run as (jailer)")
	gid := jailer.Int("gid", -1, "group to run as (jailer)")
	base := jailer.String("chroot-base-dir", "/srv/jailer", "where jails are made (jailer)")
	args := os.Args[1:]
	var jail *fctest.Jail
	if len(args) > 0 && (args[0] == "--exec-file" || args[0] == "--id") {
		jailer.Parse(args)
		if *execFile == "" || *jid == "" || *uid <= 0 || *gid <= 0 {
			fail(fmt.Errorf("jailer: --exec-file, --id, --uid and --gid are required, uid and gid not 0"))
		}
		root := filepath.Join(*base, filepath.Base(*execFile), *jid, "root")
		if err := os.MkdirAll(root, 0o755); err != nil {
			fail(err)
		}
		// As the jailer does: the jail's root belongs to its user.
		if err := os.Chown(root, *uid, *gid); err != nil {
			fail(err)
		}
		jail = &fctest.Jail{Root: root, UID: *uid, GID: *gid}
		args = append([]string{"--id", *jid}, jailer.Args()...)
	}
	fcFlags := flag.NewFlagSet("firecracker", flag.ExitOnError)
	sock := fcFlags.String("api-sock", "/run/firecracker.socket", "API socket path")
	id := fcFlags.String("id", "anonymous-instance", "microVM id")
	fcFlags.Parse(args)
	path := *sock
	var confine vmm.Confine
	if jail != nil {
		path = filepath.Join(jail.Root, filepath.Clean("/"+*sock))
		confine = vmm.Confine{UID: uint32(jail.UID), GID: uint32(jail.GID)}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		fail(err)
	}
	b := &fctest.QEMUBackend{ID: *id, Dir: filepath.Join(filepath.Dir(path), "fc-qemu"), Console: os.Stdout, Confine: confine}
	api := fctest.NewServer(*id, b)
	api.Log, api.Jail = os.Stderr, jail
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
