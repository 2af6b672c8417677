package appconfig

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/kilnhq/kiln/internal/errdefs"
)

// document is the file's shape where it differs from Config's: values Fly accepts in
// several forms are read here and written into Config in one form.
type document struct {
	Config
	KillTimeout seconds             `toml:"kill_timeout"`
	Env         map[string]envValue `toml:"env"`
	Mounts      toml.Primitive      `toml:"mounts"` // a table or an array of tables
	VM          toml.Primitive      `toml:"vm"`
	Metrics     toml.Primitive      `toml:"metrics"`
	Processes   toml.Primitive      `toml:"processes"` // a table; Fly also reads an array
	Deploy      deployDocument      `toml:"deploy"`
}

type deployDocument struct {
	Deploy
	ReleaseCommandVM      *VM     `toml:"release_command_vm"`
	ReleaseCommandTimeout seconds `toml:"release_command_timeout"`
	WaitTimeout           seconds `toml:"wait_timeout"`
}

// ignoredKeys are keys Fly documents that kiln accepts with no effect, by dotted path
// ("*" stands for any one name); a key under one is covered by it.
var ignoredKeys = map[string]string{
	"primary_region":                      "kiln places machines by capacity, not by region",
	"swap_size_mb":                        "kiln's machines have no swap",
	"console_command":                     "kiln has no console machines",
	"host_dedication_id":                  "kiln runs on the operator's own hosts",
	"vm.host_dedication_id":               "kiln runs on the operator's own hosts",
	"vm.persist_rootfs":                   "a kiln machine's root filesystem is its image",
	"vm.cpu_kind":                         "every kiln vCPU is a share of the host's",
	"deploy.release_command_vm.cpu_kind":  "every kiln vCPU is a share of the host's",
	"http_service.force_https":            "kiln's proxy serves plain HTTP only",
	"services.ports.force_https":          "kiln's proxy serves plain HTTP only",
	"http_service.tls_options":            "kiln's proxy does not terminate TLS",
	"services.ports.tls_options":          "kiln's proxy does not terminate TLS",
	"http_service.http_options":           "kiln's proxy speaks HTTP/1.1 and passes responses unchanged",
	"services.ports.http_options":         "kiln's proxy speaks HTTP/1.1 and passes responses unchanged",
	"services.tcp_checks.restart_limit":   "Fly honours it for V1 apps only",
	"services.http_checks.restart_limit":  "Fly honours it for V1 apps only",
	"mounts.snapshot_retention":           "kiln's volumes have no snapshots",
	"mounts.scheduled_snapshots":          "kiln's volumes have no snapshots",
	"mounts.auto_extend_size_threshold":   "kiln's volumes do not grow by themselves",
	"mounts.auto_extend_size_increment":   "kiln's volumes do not grow by themselves",
	"mounts.auto_extend_size_limit":       "kiln's volumes do not grow by themselves",
	"metrics":                             "kiln does not scrape apps' metrics",
	"experimental.auto_rollback":          "kiln always rolls a failed deploy back",
	"experimental.lazy_load_images":       "kiln converts the whole image before a machine boots",
	"experimental.use_zstd":               "kiln's registry stores layers as built",
	"build.compression":                   "kiln's registry stores layers as built",
	"build.compression_level":             "kiln's registry stores layers as built",
	"deploy.release_command_vm.processes": "the release command runs in one machine of its own",
	// Written by `fly launch` for Fly's V1 apps; Fly's V2 ignores them too.
	"services.script_checks":            "Fly's V1 apps only",
	"experimental.allowed_public_ports": "Fly's V1 apps only",
	"experimental.private_network":      "Fly's V1 apps only",
}

// refusedKeys are keys Fly documents that kiln cannot honour: a workload would miss
// what they promise. Each is refused with ErrNotImplemented and what to do instead.
var refusedKeys = map[string]string{
	"build.builder":                         "kiln builds Dockerfiles only, not buildpacks: remove it and add a Dockerfile",
	"build.buildpacks":                      "kiln builds Dockerfiles only, not buildpacks: remove it and add a Dockerfile",
	"build.builtin":                         "kiln builds Dockerfiles only, not Fly's builtins: remove it and add a Dockerfile",
	"build.settings":                        "kiln builds Dockerfiles only, not buildpacks: remove it",
	"build.compose":                         "kiln builds one Dockerfile, not a compose file",
	"statics":                               "kiln serves no static files: serve them from the app",
	"machine_checks":                        "kiln runs no test machines during a deploy: use health checks",
	"http_service.machine_checks":           "kiln runs no test machines during a deploy: use health checks",
	"services.machine_checks":               "kiln runs no test machines during a deploy: use health checks",
	"machine_config":                        "kiln's machines run one image, not containers",
	"container":                             "kiln's machines run one image, not containers",
	"experimental.machine_config":           "kiln's machines run one image, not containers",
	"experimental.enable_consul":            "kiln has no Consul to attach",
	"experimental.enable_etcd":              "kiln has no etcd to attach",
	"experimental.attached":                 "kiln has no attached secrets: use kiln secrets",
	"deploy.seed_command":                   "kiln runs no seed command: run it once with kiln machine exec",
	"vm.gpus":                               "kiln's machines have no GPUs",
	"vm.gpu_kind":                           "kiln's machines have no GPUs",
	"vm.kernel_args":                        "kiln boots its own guest kernel with fixed arguments",
	"deploy.release_command_vm.gpus":        "kiln's machines have no GPUs",
	"deploy.release_command_vm.gpu_kind":    "kiln's machines have no GPUs",
	"deploy.release_command_vm.kernel_args": "kiln boots its own guest kernel with fixed arguments",
	"services.ports.start_port":             "kiln's proxy serves single ports, not ranges: list each port",
	"services.ports.end_port":               "kiln's proxy serves single ports, not ranges: list each port",
	"services.ports.proxy_proto_options":    "kiln's proxy does not send the PROXY protocol",
}

// under gives the entry of table that covers key (key itself or a table above it).
func under(table map[string]string, key toml.Key) (string, bool) {
	for i := len(key); i > 0; i-- {
		if _, ok := table[strings.Join(key[:i], ".")]; ok {
			return strings.Join(key[:i], "."), true
		}
	}
	return "", false
}

// Parse reads a config file's content. name is the file's name, used in errors
// ("fly.toml: ..."). Unknown keys, keys kiln cannot honour and invalid values are
// errors, each naming the key.
func Parse(name string, data []byte) (*Config, error) {
	if len(data) > MaxFileBytes {
		return nil, errdefs.Invalid("%s is over the limit of %d KiB for an app config: is it the right file?", name, MaxFileBytes>>10)
	}
	var doc document
	md, err := toml.Decode(string(data), &doc)
	if err != nil {
		return nil, syntaxError(name, data, err)
	}
	c := &doc.Config
	if c.Mounts, err = tableOrArray[Mount](&md, doc.Mounts, "mounts"); err != nil {
		return nil, syntaxError(name, data, err)
	}
	if c.VM, err = tableOrArray[VM](&md, doc.VM, "vm"); err != nil {
		return nil, syntaxError(name, data, err)
	}
	if c.Metrics, err = tableOrArray[Metrics](&md, doc.Metrics, "metrics"); err != nil {
		return nil, syntaxError(name, data, err)
	}
	if c.Processes, err = processes(&md, doc.Processes); err != nil {
		return nil, syntaxError(name, data, err)
	}
	if err := checkKeys(name, &md); err != nil {
		return nil, err
	}
	if err := doc.convert(&md); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalid, err, "%s", name)
	}
	c.Ignored = ignored(&md)
	if err := c.validate(); err != nil {
		kind := errdefs.KindOf(err)
		if kind == nil {
			kind = errdefs.ErrInvalid
		}
		return nil, errdefs.Wrap(kind, err, "%s", name)
	}
	if c.Kiln.Project == "" {
		c.Kiln.Project = c.App
	}
	return canonical(c)
}

// syntaxError gives a TOML error its file, line and column (and key, where known).
func syntaxError(name string, data []byte, err error) error {
	var pe toml.ParseError
	if errors.As(err, &pe) {
		at := ""
		if pe.LastKey != "" {
			at = pe.LastKey + ": "
		}
		return errdefs.New(errdefs.ErrInvalid, "%s:%d:%d: %s%s", name, pe.Position.Line, pe.Position.Col, at, pe.Message)
	}
	// A value of the wrong type: the decoder names the line and the key only.
	if m := typeErrorRE.FindStringSubmatch(err.Error()); m != nil {
		line, _ := strconv.Atoi(m[1])
		return errdefs.New(errdefs.ErrInvalid, "%s:%d:%d: %s: %s", name, line, column(data, line, m[2]), m[2], m[3])
	}
	return errdefs.New(errdefs.ErrInvalid, "%s: %s", name, strings.TrimPrefix(err.Error(), "toml: "))
}

var typeErrorRE = regexp.MustCompile(`^toml: line (\d+) \(last key "([^"]*)"\): (.*)$`)

// column is where key's last part starts on line (1-based), or 1.
func column(data []byte, line int, key string) int {
	lines := strings.Split(string(data), "\n")
	if line < 1 || line > len(lines) {
		return 1
	}
	last := key[strings.LastIndex(key, ".")+1:]
	if i := strings.Index(lines[line-1], last); i >= 0 {
		return i + 1
	}
	return 1
}

// tableOrArray decodes key, which Fly takes as one table or as an array of tables.
func tableOrArray[T any](md *toml.MetaData, p toml.Primitive, key string) ([]T, error) {
	if !md.IsDefined(key) {
		return nil, nil
	}
	if md.Type(key) == "Hash" {
		var one T
		err := md.PrimitiveDecode(p, &one)
		return []T{one}, err
	}
	var many []T
	err := md.PrimitiveDecode(p, &many)
	return many, err
}

// processes decodes [processes]: a table of group = "command", or the array of
// {name, command} tables (often empty) that Fly's V1 apps wrote and Fly still reads.
func processes(md *toml.MetaData, p toml.Primitive) (map[string]string, error) {
	if !md.IsDefined("processes") {
		return nil, nil
	}
	if md.Type("processes") == "Hash" {
		var m map[string]string
		err := md.PrimitiveDecode(p, &m)
		return m, err
	}
	var list []struct {
		Name    string `toml:"name"`
		Command string `toml:"command"`
	}
	if err := md.PrimitiveDecode(p, &list); err != nil {
		return nil, err
	}
	var m map[string]string
	for _, x := range list {
		if m == nil {
			m = map[string]string{}
		}
		m[x.Name] = x.Command
	}
	return m, nil
}

// checkKeys refuses keys Fly does not document (all of them, in one error) and keys
// kiln cannot honour.
func checkKeys(name string, md *toml.MetaData) error {
	var unknown, refused []string
	for _, k := range md.Undecoded() {
		if _, ok := under(ignoredKeys, k); ok {
			continue
		}
		if path, ok := under(refusedKeys, k); ok {
			refused = append(refused, fmt.Sprintf("%s: %s", path, refusedKeys[path]))
			continue
		}
		unknown = append(unknown, fmt.Sprintf("%q", k.String()))
	}
	if len(unknown) > 0 {
		slices.Sort(unknown)
		noun, pronoun := "key", "it"
		if len(unknown) > 1 {
			noun, pronoun = "keys", "them"
		}
		return errdefs.Invalid("%s: unknown %s %s: Fly does not document %s (check the spelling against https://fly.io/docs/reference/configuration/)",
			name, noun, strings.Join(unknown, ", "), pronoun)
	}
	if len(refused) > 0 {
		slices.Sort(refused)
		refused = slices.Compact(refused)
		return errdefs.New(errdefs.ErrNotImplemented, "%s: not supported by kiln, leave it out: %s", name, strings.Join(refused, "; "))
	}
	return nil
}

// ignored lists the keys of the file that kiln accepts with no effect.
func ignored(md *toml.MetaData) []string {
	var out []string
	for _, k := range md.Keys() {
		if path, ok := under(ignoredKeys, k); ok {
			out = append(out, path+": "+ignoredKeys[path])
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// convert writes the document's values that Config holds in another type.
func (doc *document) convert(md *toml.MetaData) error {
	// Zero is how a Config says "Fly's default"; written in the file it is a mistake.
	if md.IsDefined("deploy", "max_unavailable") && doc.Deploy.MaxUnavailable <= 0 {
		return errdefs.Invalid("deploy.max_unavailable %v: want a fraction of the machines (0 < x < 1, like 0.25) or a count of at least 1", doc.Deploy.MaxUnavailable)
	}
	c := &doc.Config
	c.KillTimeout = string(doc.KillTimeout)
	for k, v := range doc.Env {
		if c.Env == nil {
			c.Env = map[string]string{}
		}
		c.Env[k] = string(v)
	}
	c.Deploy = doc.Deploy.Deploy
	c.Deploy.ReleaseCommandVM = doc.Deploy.ReleaseCommandVM
	c.Deploy.WaitTimeout = string(doc.Deploy.WaitTimeout)
	c.Deploy.ReleaseCommandTimeout = string(doc.Deploy.ReleaseCommandTimeout)
	return nil
}

// seconds is a duration that the file may give as an integer of seconds.
type seconds string

func (s *seconds) UnmarshalTOML(v any) error {
	d, err := durationValue(v, time.Second, "seconds")
	*s = seconds(d)
	return err
}

// envValue is an [env] value: Fly takes any scalar and sets its text.
type envValue string

func (e *envValue) UnmarshalTOML(v any) error {
	switch v.(type) {
	case string, int64, float64, bool:
		*e = envValue(fmt.Sprint(v))
		return nil
	}
	return fmt.Errorf("want a string, not %v", v)
}

// canonical gives the config as JSON gives it back, so that what a release stores
// and reads back is equal to what Parse returned (no empty-but-not-nil maps).
func canonical(c *Config) (*Config, error) {
	raw, err := json.Marshal(c)
	if err != nil {
		return nil, err
	}
	var out Config
	if err := json.Unmarshal(raw, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
