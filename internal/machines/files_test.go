package machines

import (
	"strings"
	"testing"

	"github.com/kilnhq/kiln/api"
)

// config.files become the agent's files: raw_value or the named secret, decoded; a
// secret the app lacks is refused by name.
func TestGuestFiles(t *testing.T) {
	raw, name := "aGVsbG8K", "TLS_KEY"
	files := []api.File{{GuestPath: "/etc/a", RawValue: &raw, Mode: 0o600}, {GuestPath: "/etc/key.pem", SecretName: &name}}
	got, err := guestFiles(files, map[string]string{"TLS_KEY": "c2VjcmV0Cg=="})
	if err != nil || len(got) != 2 || string(got[0].Data) != "hello\n" || got[0].Mode != 0o600 || string(got[1].Data) != "secret\n" || got[1].Path != "/etc/key.pem" {
		t.Fatalf("%+v %v", got, err)
	}
	if _, err := guestFiles(files, nil); err == nil || !strings.Contains(err.Error(), "TLS_KEY") {
		t.Fatalf("a missing secret: %v", err)
	}
}
