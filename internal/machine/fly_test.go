package machine

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/errdefs"
)

// A config as Fly's client sends it: the fields kiln ignores pass and are kept; those it
// cannot honour are refused, naming the field, unless empty; Fly's size presets set the
// guest's size where it is not given.
func TestFlyConfigFields(t *testing.T) {
	decode := func(s string) api.MachineConfig {
		t.Helper()
		var c api.MachineConfig
		if err := json.Unmarshal([]byte(s), &c); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
		return c
	}
	ok := decode(`{"image":"localhost/app:1","dns":{"skip_registration":true},"checks":{"alive":{"type":"tcp","port":8080}},
		"guest":{"cpu_kind":"shared","cpus":1,"memory_mb":256,"gpus":0,"kernel_args":[]},"files":null,"processes":[],
		"init":{"tty":false,"swap_size_mb":512},"services":[{"internal_port":8080,"protocol":"tcp","autostop":true,
		"ports":[{"port":80,"handlers":["http"],"force_https":true}]}]}`)
	if err := Validate(&ok); err != nil {
		t.Fatalf("a config with Fly's ignored and empty fields: %v", err)
	}
	if out, _ := json.Marshal(ok); !strings.Contains(string(out), `"skip_registration":true`) || !strings.Contains(string(out), `"swap_size_mb":512`) {
		t.Errorf("ignored fields are not kept as sent: %s", out)
	}
	for field, cfg := range map[string]string{
		"config.processes":                     `{"image":"localhost/app:1","processes":[{"cmd":["x"]}]}`,
		"config.schedule":                      `{"image":"localhost/app:1","schedule":"hourly"}`,
		"config.guest.gpus":                    `{"image":"localhost/app:1","guest":{"gpus":1}}`,
		"config.init.kernel_args":              `{"image":"localhost/app:1","init":{"kernel_args":["quiet"]}}`,
		"config.services[0].ports[0].end_port": `{"image":"localhost/app:1","services":[{"internal_port":80,"protocol":"tcp","ports":[{"port":80,"end_port":90}]}]}`,
	} {
		c := decode(cfg)
		err := Validate(&c)
		if !errors.Is(err, errdefs.ErrNotImplemented) || !strings.Contains(err.Error(), field) {
			t.Errorf("%s: %v, want not implemented naming %s", cfg, err, field)
		}
	}

	// config.files: written before the workload starts; bad ones are refused by name.
	files := decode(`{"image":"localhost/app:1","files":[{"guest_path":"/etc/x","raw_value":"eA=="},{"guest_path":"/etc/k","secret_name":"K","mode":384}]}`)
	if err := Validate(&files); err != nil {
		t.Errorf("config.files: %v", err)
	}
	for cfg, want := range map[string]string{
		`{"image":"i","files":[{"guest_path":"etc/x","raw_value":"eA=="}]}`:                             "guest_path",
		`{"image":"i","files":[{"guest_path":"/etc/../x","raw_value":"eA=="}]}`:                         "guest_path",
		`{"image":"i","files":[{"guest_path":"/proc/sys/x","raw_value":"eA=="}]}`:                       "/proc",
		`{"image":"i","files":[{"guest_path":"/etc/x","raw_value":"not base64!"}]}`:                     "base64",
		`{"image":"i","files":[{"guest_path":"/etc/x"}]}`:                                               "raw_value",
		`{"image":"i","files":[{"guest_path":"/x","raw_value":"","secret_name":"K"}]}`:                  "one of them",
		`{"image":"i","files":[{"guest_path":"/x","raw_value":"eA==","mode":999999}]}`:                  "mode",
		`{"image":"i","files":[{"guest_path":"/x","raw_value":""},{"guest_path":"/x","raw_value":""}]}`: "twice",
	} {
		c := decode(cfg)
		if err := Validate(&c); !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want invalid naming %s", cfg, err, want)
		}
	}

	sized := decode(`{"image":"localhost/app:1","size":"shared-cpu-1x"}`)
	if err := Validate(&sized); err != nil || sized.Guest.CPUs != 1 || sized.Guest.MemoryMB != 256 {
		t.Errorf("size shared-cpu-1x: %+v %v", sized.Guest, err)
	}
	bad := decode(`{"image":"localhost/app:1","size":"huge"}`)
	if err := Validate(&bad); !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "shared-cpu-1x") {
		t.Errorf("an unknown size: %v, want invalid listing the sizes", err)
	}

	many := decode(`{"image":"localhost/app:1"}`)
	many.Metadata = map[string]string{}
	for i := 0; i <= MaxMetadataKeys; i++ {
		many.Metadata[strings.Repeat("k", i+1)] = "v"
	}
	if err := Validate(&many); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("%d metadata keys: %v, want invalid", len(many.Metadata), err)
	}

	// Ignored fields are kept as sent, so they count toward the stored config's bound,
	// as stored: "<" is six bytes there.
	big := decode(`{"image":"localhost/app:1","checks":"` + strings.Repeat("<", MaxConfigBytes/6+1) + `"}`)
	if err := Validate(&big); !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "KiB") {
		t.Errorf("a config over %d bytes as stored: %v, want invalid", MaxConfigBytes, err)
	}
}
