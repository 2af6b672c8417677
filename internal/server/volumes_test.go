package server_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnhq/kiln/internal/machines"
	"github.com/kilnhq/kiln/internal/server"
	"github.com/kilnhq/kiln/internal/store/sqlstore"
	"github.com/kilnhq/kiln/internal/vmrun"
)

// volumeAPI serves the API on a fresh database with app web; its volumes are real
// (small, sparse) ext4 images and no machine runs.
func volumeAPI(t *testing.T) func(method, path, body string) (int, map[string]any, string) {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	db, err := sqlstore.Open(ctx, filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	db.CreateApp(ctx, "web")
	ms := machines.New(machines.Config{Store: db, VMs: &vmrun.Runtime{DataDir: dir}, Dir: filepath.Join(dir, "machines")})
	t.Cleanup(ms.Close)
	srv := httptest.NewServer((&server.Server{Store: db, Node: ms, Auth: opAuth}).Handler())
	t.Cleanup(srv.Close)
	return func(method, path, body string) (int, map[string]any, string) {
		t.Helper()
		var r io.Reader
		if body != "" {
			r = strings.NewReader(body)
		}
		req, _ := http.NewRequest(method, srv.URL+"/v1/apps/web/volumes"+path, r)
		req.Header.Set("Authorization", "Bearer "+opToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		var out map[string]any
		json.Unmarshal(raw, &out)
		return resp.StatusCode, out, string(raw)
	}
}

// flapsCreate is the body fly-go's flaps client sends for fly.CreateVolumeRequest with
// only a name and a size: every other field but compute_image as null.
const flapsCreate = `{"name":"data","region":"","size_gb":1,"encrypted":null,"require_unique_zone":null,` +
	`"unique_zone_app_wide":null,"snapshot_retention":null,"auto_backup_enabled":null,"fstype":null,` +
	`"snapshot_id":null,"source_volume_id":null,"compute":null}`

// What Fly's clients send is accepted, nulls included, and answered in Fly's shapes;
// unknown fields and what kiln cannot honour are refused with the field named.
func TestVolumesInFlyShapes(t *testing.T) {
	call := volumeAPI(t)
	code, v, raw := call("POST", "", flapsCreate)
	if code != 200 {
		t.Fatalf("create as flaps sends it: %d %s", code, raw)
	}
	want := map[string]any{"name": "data", "state": "created", "size_gb": 1.0, "region": "local", "zone": "local",
		"encrypted": false, "attached_machine_id": nil, "attached_alloc_id": nil, "snapshot_retention": 5.0,
		"auto_backup_enabled": false, "host_status": "ok", "fstype": "ext4"}
	for k, w := range want {
		if got, ok := v[k]; !ok || got != w {
			t.Errorf("volume %s = %#v (present %v), want %#v", k, got, ok, w)
		}
	}
	id, _ := v["id"].(string)
	if !strings.HasPrefix(id, "vol_") || v["created_at"] == nil || v["used_bytes"] == nil {
		t.Errorf("volume: %s", raw)
	}

	// What flyctl sets by default, and the fields kiln ignores, with values.
	code, _, raw = call("POST", "", `{"name":"other_data","region":"ams","size_gb":2,"encrypted":true,"require_unique_zone":true,`+
		`"unique_zone_app_wide":false,"snapshot_retention":7,"auto_backup_enabled":false,"fstype":"ext4","snapshot_id":null,`+
		`"source_volume_id":null,"compute":{"cpu_kind":"shared","cpus":1,"memory_mb":256},"compute_image":"img","machines_only":true}`)
	if code != 200 || !strings.Contains(raw, `"snapshot_retention":7`) || !strings.Contains(raw, `"encrypted":false`) {
		t.Errorf("create with every field: %d %s", code, raw)
	}

	for _, tc := range []struct {
		body string
		code int
		want string
	}{
		{`{"name":"x","size_gb":1,"nope":1}`, 400, `unknown field \"nope\"`},
		{`{"name":"x","size_gb":1,"fstype":"raw"}`, 501, "fstype"},
		{`{"name":"x","size_gb":0}`, 400, "size_gb=0"},
		{`{"name":"x","size_gb":1,"snapshot_retention":0}`, 400, "snapshot_retention=0"},
		{`{"name":"x","size_gb":1,"snapshot_retention":61}`, 400, "snapshot_retention=61"},
		{`{"name":"Bad Name","size_gb":1}`, 400, "volume name"},
		{`{"name":"x","snapshot_id":"vs_1","source_volume_id":"data"}`, 400, "source_volume_id"},
		{`{"name":"x","source_volume_id":"vol_nope"}`, 404, "vol_nope"},
	} {
		if code, _, raw := call("POST", "", tc.body); code != tc.code || !strings.Contains(raw, tc.want) {
			t.Errorf("%s: %d %s, want %d naming %s", tc.body, code, raw, tc.code, tc.want)
		}
	}

	// Update, as flaps sends it (PUT) and as Fly documents it (POST); null keeps a setting.
	if code, v, raw := call("PUT", "/"+id, `{"snapshot_retention":3,"auto_backup_enabled":null}`); code != 200 ||
		v["snapshot_retention"] != 3.0 || v["auto_backup_enabled"] != false {
		t.Errorf("update retention: %d %s", code, raw)
	}
	if code, v, raw := call("POST", "/data", `{"snapshot_retention":null,"auto_backup_enabled":true}`); code != 200 ||
		v["snapshot_retention"] != 3.0 || v["auto_backup_enabled"] != true {
		t.Errorf("update auto backup: %d %s", code, raw)
	}
	if code, _, raw := call("PUT", "/"+id, `{"snapshot_retention":-1}`); code != 400 || !strings.Contains(raw, "snapshot_retention") {
		t.Errorf("update with a bad retention: %d %s", code, raw)
	}

	// A snapshot is taken with no body and listed in Fly's shape.
	if code, _, raw := call("POST", "/"+id+"/snapshots", ""); code != 200 {
		t.Fatalf("snapshot without a body: %d %s", code, raw)
	}
	code, _, raw = call("GET", "/"+id+"/snapshots", "")
	var sns []map[string]any
	if err := json.Unmarshal([]byte(raw), &sns); code != 200 || err != nil || len(sns) != 1 {
		t.Fatalf("snapshots: %d %s", code, raw)
	}
	sn := sns[0]
	if size, ok := sn["size"].(float64); !ok || size <= 0 || size != float64(int64(size)) ||
		sn["volume_size"] != float64(1<<30) || sn["status"] != "created" || sn["retention_days"] != 3.0 ||
		sn["digest"] != "" || sn["created_at"] == nil || !strings.HasPrefix(sn["id"].(string), "vs_") {
		t.Errorf("snapshot: %s", raw)
	}

	// A fork takes its source's size when size_gb is null.
	code, fork, raw := call("POST", "", `{"name":"fork","size_gb":null,"source_volume_id":"`+id+`"}`)
	if code != 200 || fork["size_gb"] != 1.0 || fork["id"] == id {
		t.Errorf("fork: %d %s", code, raw)
	}
	code, _, raw = call("PUT", "/"+id+"/extend", `{"size_gb":2}`)
	if code != 200 || !strings.Contains(raw, `"needs_restart":false`) || !strings.Contains(raw, `"size_gb":2`) {
		t.Errorf("extend: %d %s", code, raw)
	}

	// Delete answers with the volume, destroyed; it is gone from the list.
	if code, v, raw := call("DELETE", "/"+id, ""); code != 200 || v["state"] != "destroyed" || v["id"] != id {
		t.Errorf("delete: %d %s", code, raw)
	}
	if code, _, raw := call("GET", "", ""); code != 200 || strings.Contains(raw, id) || !strings.Contains(raw, `"name":"fork"`) {
		t.Errorf("list after delete: %d %s", code, raw)
	}
}
