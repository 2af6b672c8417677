package api

import (
	"encoding/json"
	"reflect"
	"testing"
)

// Fly's clients write some fields in other forms than kiln's own: each is read as the
// same value, and a form that means nothing is refused.
func TestFlyForms(t *testing.T) {
	var e ExecRequest
	if err := json.Unmarshal([]byte(`{"cmd":"sh -c 'echo \"a b\"; exit 3'"}`), &e); err != nil {
		t.Fatal(err)
	}
	if want := (Argv{"sh", "-c", `echo "a b"; exit 3`}); !reflect.DeepEqual(e.Cmd, want) {
		t.Errorf("cmd as a string: %q, want %q", e.Cmd, want)
	}
	if err := json.Unmarshal([]byte(`{"cmd":["ls","-l"]}`), &e); err != nil || !reflect.DeepEqual(e.Cmd, Argv{"ls", "-l"}) {
		t.Errorf("cmd as a list: %q %v", e.Cmd, err)
	}
	if err := json.Unmarshal([]byte(`{"cmd":"echo 'unterminated"}`), &e); err == nil {
		t.Error("an unterminated quote was accepted")
	}

	var s SignalRequest
	if err := json.Unmarshal([]byte(`{"signal":9}`), &s); err != nil || s.Signal != "9" {
		t.Errorf("signal as a number: %q %v", s.Signal, err)
	}
	if err := json.Unmarshal([]byte(`{"signal":"SIGTERM"}`), &s); err != nil || s.Signal != "SIGTERM" {
		t.Errorf("signal as a name: %q %v", s.Signal, err)
	}

	var st StopRequest
	if err := json.Unmarshal([]byte(`{"id":"m","timeout":5000000000}`), &st); err != nil || st.Timeout != "5s" {
		t.Errorf("timeout in nanoseconds: %q %v", st.Timeout, err)
	}
	if err := json.Unmarshal([]byte(`{"timeout":"10s"}`), &st); err != nil || st.Timeout != "10s" {
		t.Errorf("timeout as a string: %q %v", st.Timeout, err)
	}
	if err := json.Unmarshal([]byte(`{"timeout":1.5}`), &st); err == nil {
		t.Error("a fractional number of nanoseconds was accepted")
	}

	var svc Service
	for in, want := range map[string]Autostop{`true`: "stop", `false`: "off", `"suspend"`: "suspend"} {
		if err := json.Unmarshal([]byte(`{"autostop":`+in+`}`), &svc); err != nil || svc.Autostop != want {
			t.Errorf("autostop %s: %q %v, want %q", in, svc.Autostop, err, want)
		}
	}
	if err := json.Unmarshal([]byte(`{"autostop":3}`), &svc); err == nil {
		t.Error("autostop 3 was accepted")
	}
}
