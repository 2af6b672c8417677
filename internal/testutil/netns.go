package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"github.com/vishvananda/netlink"
)

const netnsEnv = "KILN_TEST_IN_NETNS"

// InNetNS runs the test binary again in a network namespace of its own, so that the
// bridges, TAP devices, rules and traffic its tests make never reach the host's network.
// Call it first in TestMain: in the parent it returns the child's exit code and true;
// in the child (loopback up) it returns false and the tests run.
func InNetNS() (code int, ran bool) {
	if os.Getenv(netnsEnv) != "" {
		if lo, err := netlink.LinkByName("lo"); err == nil {
			netlink.LinkSetUp(lo)
		}
		return 0, false
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "InNetNS:", err)
		return 1, true
	}
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), netnsEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode(), true
		}
		fmt.Fprintf(os.Stderr, "InNetNS: running the tests in a new network namespace needs root (CAP_SYS_ADMIN): %v\n", err)
		return 1, true
	}
	return 0, true
}
