package agent_test

import (
	"context"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// Through the agent protocol, on the real /proc, this test's own process is found with
// its command, directory, memory and the TCP socket it listens on.
func TestPs(t *testing.T) {
	c := connect(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	procs, err := c.Ps(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wd, _ := os.Getwd()
	for _, p := range procs {
		if int(p.PID) != os.Getpid() {
			continue
		}
		if !strings.HasPrefix(p.Command, os.Args[0]) || p.Dir != wd || p.RSS == 0 {
			t.Errorf("self: command %q dir %q rss %d; want %q in %q", p.Command, p.Dir, p.RSS, os.Args[0], wd)
		}
		for _, s := range p.Listen {
			if s.Proto == "tcp" && s.Address == l.Addr().String() {
				return
			}
		}
		t.Fatalf("self listens on %v; want tcp %s among them", p.Listen, l.Addr())
	}
	t.Fatalf("pid %d not among %d processes listed", os.Getpid(), len(procs))
}
