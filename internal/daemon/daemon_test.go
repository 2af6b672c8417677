package daemon

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// options are settings that pass check, for a server in dir without network or proxy.
func options(dir string) Options {
	return Options{DataDir: dir, Listen: "127.0.0.1:0", VMM: "qemu", ProxyListen: "off", Idle: time.Minute, Wake: time.Minute,
		BuildCacheBytes: 1 << 30, BuildMaxContext: 1 << 20, BuilderCPUs: 1, BuilderMemory: 512, BuilderIdle: time.Minute, MaxBuilds: 1,
		GitTimeout: time.Minute, CPUOvercommit: 1, MemOvercommit: 1, ReserveMemory: 0,
		HeaderTimeout: time.Second, ConnIdle: time.Second, MaxHeaderBytes: 64 << 10, APIMaxUnauth: 1, ProxyMaxPending: 1, TCPMaxConns: 1, TCPIdle: time.Second,
		ImageMaxBytes: 1 << 30, VMUIDs: vmrun.DefaultUIDs.String()}
}

func TestVMMIsASetting(t *testing.T) {
	errStop := errors.New("runtime asked for")
	for _, tc := range []struct {
		vmm  string
		kind error
		says string
	}{
		{"qemu", nil, ""},
		{"firecracker", nil, ""},
		{"auto", nil, ""},
		{"bogus", errdefs.ErrInvalid, `--vmm "bogus": use qemu, firecracker or auto`},
	} {
		t.Run(tc.vmm, func(t *testing.T) {
			o := options(t.TempDir())
			o.VMM = tc.vmm
			var asked string
			err := Run(context.Background(), o, Host{
				Reap: func(context.Context, io.Writer) {},
				Runtime: func(_ context.Context, vmm string, _ io.Writer) (*vmrun.Runtime, string, error) {
					asked = vmm
					return nil, "", errStop
				},
			})
			if tc.kind == nil {
				if !errors.Is(err, errStop) || asked != tc.vmm {
					t.Fatalf("Run = %v, runtime asked for %q; want the runtime on %s", err, asked, tc.vmm)
				}
				return
			}
			if !errors.Is(err, tc.kind) || !strings.Contains(err.Error(), tc.says) || asked != "" {
				t.Fatalf("Run = %v (runtime asked for %q); want %v saying %q before any runtime", err, asked, tc.kind, tc.says)
			}
		})
	}
}

func TestLogFormatIsChecked(t *testing.T) {
	o := options(t.TempDir())
	o.LogFormat = "xml"
	asked := false
	err := Run(context.Background(), o, Host{
		Reap: func(context.Context, io.Writer) {},
		Runtime: func(context.Context, string, io.Writer) (*vmrun.Runtime, string, error) {
			asked = true
			return nil, "", errors.New("runtime asked for")
		},
	})
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "--log-format") || asked {
		t.Fatalf("Run = %v (runtime asked for: %v); want ErrInvalid naming --log-format before any runtime", err, asked)
	}
}
