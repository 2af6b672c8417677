package server_test

import (
	"encoding/json"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kilnhq/kiln/api"
)

// differsKey marks, on an operation, how kiln differs from Fly's documented behaviour.
const differsKey = "x-kiln-differs-from-fly"

// openapiDoc is the served document, decoded loosely so every field can be checked.
func openapiDoc(t *testing.T) map[string]any {
	t.Helper()
	var doc map[string]any
	if err := json.Unmarshal(api.OpenAPI, &doc); err != nil {
		t.Fatalf("openapi.json: %v", err)
	}
	return doc
}

// operations maps "METHOD PATH" to each operation of the document.
func operations(doc map[string]any) map[string]map[string]any {
	out := map[string]map[string]any{}
	for path, ops := range doc["paths"].(map[string]any) {
		for method, op := range ops.(map[string]any) {
			if o, ok := op.(map[string]any); ok && method != "parameters" {
				out[strings.ToUpper(method)+" "+path] = o
			}
		}
	}
	return out
}

// kilnOnly says whether a route is kiln's own: Fly's Machines API has no such endpoint.
func kilnOnly(route string) bool {
	_, path, _ := strings.Cut(route, " ")
	return !strings.HasPrefix(path, "/v1/apps") || strings.HasSuffix(path, "/machines/{id}/logs")
}

// Every operation says what it does, and where it differs from Fly says how, under one
// key, so a Fly user reading the document finds every difference in one place.
func TestOpenAPIOperationsSayHowTheyDiffer(t *testing.T) {
	for route, op := range operations(openapiDoc(t)) {
		if s, _ := op["summary"].(string); strings.TrimSpace(s) == "" {
			t.Errorf("%s has no summary", route)
		}
		for k := range op {
			if strings.HasPrefix(k, "x-kiln") && k != differsKey {
				t.Errorf("%s has %s: say how kiln differs from Fly under %s", route, k, differsKey)
			}
		}
		v, present := op[differsKey]
		differs, ok := v.(string)
		if present && (!ok || strings.TrimSpace(differs) == "") {
			t.Errorf("%s: %s is %#v, want a non-empty string", route, differsKey, v)
		}
		if kilnOnly(route) && !strings.HasPrefix(differs, "kiln only") {
			t.Errorf("%s is kiln's own: its %s should start with \"kiln only\"", route, differsKey)
		}
	}
}

// parameters lists an operation's parameters of one kind (path, query, header) by name.
func parameters(op map[string]any, in string) []string {
	var out []string
	ps, _ := op["parameters"].([]any)
	for _, p := range ps {
		if p := p.(map[string]any); p["in"] == in {
			out = append(out, p["name"].(string))
		}
	}
	return out
}

// Every {name} in a route's path is a documented path parameter.
func TestOpenAPIPathParameters(t *testing.T) {
	for route, op := range operations(openapiDoc(t)) {
		documented := parameters(op, "path")
		for _, seg := range strings.Split(route, "/") {
			if name, ok := strings.CutPrefix(seg, "{"); ok {
				if name = strings.TrimSuffix(name, "}"); !slices.Contains(documented, name) {
					t.Errorf("%s does not document its path parameter %s", route, name)
				}
			}
		}
	}
}

// The query parameters the handlers read, and Fly's clients send, are documented.
func TestOpenAPIQueryParameters(t *testing.T) {
	ops := operations(openapiDoc(t))
	for route, want := range map[string][]string{
		"GET /v1/apps/{app}/machines":                 {"state", "region", "summary", "include_deleted"},
		"GET /v1/apps/{app}/machines/{id}/wait":       {"state", "version", "instance_id", "timeout"},
		"GET /v1/apps/{app}/machines/{id}/events":     {"limit"},
		"DELETE /v1/apps/{app}/machines/{id}":         {"force", "kill"},
		"POST /v1/apps/{app}/machines/{id}/restart":   {"signal", "timeout", "force_stop"},
		"POST /v1/apps/{app}/machines/{id}/lease":     {"ttl"},
		"DELETE /v1/apps/{app}":                       {"force"},
		"GET /v1/apps/{app}/machines/{id}/logs":       {"follow"},
		"GET /v1/projects/{project}/builds/{id}/logs": {"follow"},
		"GET /v1/events":                              {"follow", "app", "machine", "project", "build", "type", "after", "limit"},
	} {
		op, ok := ops[route]
		if !ok {
			t.Errorf("%s is not documented", route)
			continue
		}
		got := parameters(op, "query")
		for _, p := range want {
			if !slices.Contains(got, p) {
				t.Errorf("%s does not document query parameter %s (has %v)", route, p, got)
			}
		}
	}
}

// Both ways Fly's clients send a token are documented.
func TestOpenAPIDocumentsBothAuthSchemes(t *testing.T) {
	doc := openapiDoc(t)
	schemes := doc["components"].(map[string]any)["securitySchemes"].(map[string]any)
	var bearer, flyv1 string
	for name, s := range schemes {
		s := s.(map[string]any)
		switch {
		case s["type"] == "http" && s["scheme"] == "bearer":
			bearer = name
		case s["type"] == "apiKey" && s["in"] == "header" && s["name"] == "Authorization" && strings.Contains(s["description"].(string), "FlyV1"):
			flyv1 = name
		}
	}
	if bearer == "" || flyv1 == "" {
		t.Fatalf("securitySchemes %v: want Bearer and FlyV1 authorization", schemes)
	}
	var either []string
	for _, req := range doc["security"].([]any) {
		for name := range req.(map[string]any) {
			either = append(either, name)
		}
	}
	if !slices.Contains(either, bearer) || !slices.Contains(either, flyv1) {
		t.Errorf("security %v: want either %s or %s", either, bearer, flyv1)
	}
}

// The documented schemas have exactly the fields of the wire types, nested ones
// included: a field the server accepts but the document lacks would look refused to a
// Fly client reading it, and a documented one the server lacks is refused as unknown.
func TestOpenAPISchemasMatchTypes(t *testing.T) {
	doc := openapiDoc(t)
	schemas := doc["components"].(map[string]any)["schemas"].(map[string]any)
	for name, v := range map[string]any{
		"Error": api.Error{}, "OK": api.OK{},
		"App": api.App{}, "AppList": api.AppList{}, "CreateAppRequest": api.CreateAppRequest{},
		"Machine": api.Machine{}, "CreateMachineRequest": api.CreateMachineRequest{}, "Event": api.Event{},
		"StartResponse": api.StartResponse{}, "StopRequest": api.StopRequest{}, "WaitResponse": api.WaitResponse{},
		"ExecRequest": api.ExecRequest{}, "ExecResponse": api.ExecResponse{}, "ExecExit": api.ExecExit{},
		"SignalRequest": api.SignalRequest{}, "ProcessStat": api.ProcessStat{},
		"LeaseRequest": api.LeaseRequest{}, "LeaseResponse": api.LeaseResponse{}, "Lease": api.Lease{},
		"MetadataValue": api.MetadataValue{}, "MetadataUpdate": api.MetadataUpdate{},
		"LogLine": api.LogLine{}, "ImageLoadResponse": api.ImageLoadResponse{},
		"Volume": api.Volume{}, "CreateVolumeRequest": api.CreateVolumeRequest{}, "UpdateVolumeRequest": api.UpdateVolumeRequest{}, "Snapshot": api.Snapshot{}, "ExtendVolumeRequest": api.ExtendVolumeRequest{}, "ExtendVolumeResponse": api.ExtendVolumeResponse{}, "BuildSpec": api.BuildSpec{}, "Build": api.Build{}, "BuildCache": api.BuildCache{}, "Limit": api.Limit{}, "Host": api.Host{},
		"StreamEvent": api.StreamEvent{}, "EventList": api.EventList{},
		"DeployRequest": api.DeployRequest{}, "FieldDiff": api.FieldDiff{}, "PlanStep": api.PlanStep{}, "Plan": api.Plan{},
		"Release": api.Release{}, "DeployResponse": api.DeployResponse{}, "RollbackRequest": api.RollbackRequest{},
		"ScaleRequest": api.ScaleRequest{}, "SecretsRequest": api.SecretsRequest{}, "SecretRequest": api.SecretRequest{}, "Secrets": api.Secrets{},
	} {
		s, ok := schemas[name].(map[string]any)
		if !ok {
			t.Errorf("schema %s is not documented", name)
			continue
		}
		matchSchema(t, schemas, name, s, reflect.TypeOf(v))
	}
}

var (
	unmarshaler = reflect.TypeFor[json.Unmarshaler]()
	timeType    = reflect.TypeFor[time.Time]()
)

// matchSchema checks that schema s documents typ's JSON fields, and only those.
func matchSchema(t *testing.T, schemas map[string]any, where string, s map[string]any, typ reflect.Type) {
	t.Helper()
	for typ.Kind() == reflect.Pointer {
		typ = typ.Elem()
	}
	if ref, ok := s["$ref"].(string); ok {
		s = schemas[strings.TrimPrefix(ref, "#/components/schemas/")].(map[string]any)
	}
	// Types that decode several forms (a string or a number, a list or a line) are
	// documented by hand with oneOf; raw values are any JSON.
	if typ == timeType || reflect.PointerTo(typ).Implements(unmarshaler) || typ == reflect.TypeFor[json.RawMessage]() {
		return
	}
	switch typ.Kind() {
	case reflect.Struct:
		props, _ := s["properties"].(map[string]any)
		fields := jsonFields(typ)
		for name, ft := range fields {
			p, ok := props[name].(map[string]any)
			if !ok {
				t.Errorf("%s: field %s is not documented", where, name)
				continue
			}
			matchSchema(t, schemas, where+"."+name, p, ft)
		}
		for name := range props {
			if _, ok := fields[name]; !ok {
				t.Errorf("%s: %s is documented but the type has no such field", where, name)
			}
		}
	case reflect.Slice:
		if items, ok := s["items"].(map[string]any); ok {
			matchSchema(t, schemas, where+"[]", items, typ.Elem())
		}
	case reflect.Map:
		if add, ok := s["additionalProperties"].(map[string]any); ok {
			matchSchema(t, schemas, where+"{}", add, typ.Elem())
		}
	}
}

// jsonFields is a struct's fields by JSON name, embedded structs' included.
func jsonFields(typ reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for f := range typ.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		switch {
		case name == "-" || !f.IsExported():
		case f.Anonymous && name == "":
			for n, ft := range jsonFields(f.Type) {
				out[n] = ft
			}
		case name == "":
			out[f.Name] = f.Type
		default:
			out[name] = f.Type
		}
	}
	return out
}

// Every $ref names a schema the document has.
func TestOpenAPIRefsResolve(t *testing.T) {
	doc := openapiDoc(t)
	schemas := doc["components"].(map[string]any)["schemas"].(map[string]any)
	var walk func(where string, v any)
	walk = func(where string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if ref, ok := x.(string); ok && k == "$ref" {
					if _, ok := schemas[strings.TrimPrefix(ref, "#/components/schemas/")]; !ok || !strings.HasPrefix(ref, "#/components/schemas/") {
						t.Errorf("%s: $ref %s names no schema", where, ref)
					}
				}
				walk(where+"/"+k, x)
			}
		case []any:
			for _, x := range v {
				walk(where, x)
			}
		}
	}
	walk("", doc)
}
