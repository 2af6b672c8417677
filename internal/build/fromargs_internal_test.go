package build

import (
	"strings"
	"testing"
)

// FROM lines are expanded as BuildKit expands them: ARGs before the first FROM, their
// defaults replaced by --build-arg values, BuildKit's platform ARGs, --platform, and
// references to other stages; COPY --from images count too.
func TestFromExpandsArgs(t *testing.T) {
	df := `ARG BASE=localhost/busybox:1
ARG TAG=1
ARG TOOLS=localhost/shop/tools:${TAG}
FROM --platform=$BUILDPLATFORM ${BASE} AS build
RUN true
FROM $TOOLS AS tools
FROM build
COPY --from=localhost/library/certs:1 /etc/ssl /etc/ssl
COPY --from=tools /bin/x /bin/x
`
	for _, c := range []struct {
		args map[string]string
		want string
	}{
		{nil, "localhost/busybox:1 localhost/shop/tools:1 localhost/library/certs:1"},
		{map[string]string{"TAG": "2"}, "localhost/busybox:1 localhost/shop/tools:2 localhost/library/certs:1"},
		{map[string]string{"BASE": "localhost/other/base:9"}, "localhost/other/base:9 localhost/shop/tools:1 localhost/library/certs:1"},
	} {
		stages, err := parseStages([]byte(df), c.args)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(fromImages(stages), " "); got != c.want {
			t.Errorf("build args %v: bases %q, want %q", c.args, got, c.want)
		}
		if stages[0].Platform != "linux/amd64" && stages[0].Platform != "linux/arm64" {
			t.Errorf("--platform=$BUILDPLATFORM expanded to %q", stages[0].Platform)
		}
	}
	// An ARG that leaves FROM empty is an error naming the fix.
	if _, err := parseStages([]byte("ARG BASE\nFROM ${BASE}\n"), nil); err == nil || !strings.Contains(err.Error(), "--build-arg") {
		t.Errorf("FROM of an ARG without a value: %v", err)
	}
}

// A FROM that reaches another project's image through an ARG is refused at submission,
// as a literal one is.
func TestFromArgIsCheckedLikeALiteral(t *testing.T) {
	s := &Service{}
	for _, df := range []string{
		"FROM localhost/other/base:1\n",
		"ARG B=localhost/other/base:1\nFROM $B\n",
		"FROM localhost/shop/x:1\nCOPY --from=localhost/other/base:1 / /\n",
	} {
		stages, err := parseStages([]byte(df), nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.localBases("shop", stages); err == nil || !strings.Contains(err.Error(), "localhost/other/base:1") {
			t.Errorf("%q: %v, want a refusal naming the image", df, err)
		}
	}
	stages, _ := parseStages([]byte("ARG B=localhost/other/base:1\nFROM $B\n"), map[string]string{"B": "localhost/shop/base:1"})
	if refs, err := s.localBases("shop", stages); err != nil || len(refs) != 1 {
		t.Errorf("the build arg's own image: %v %v", refs, err)
	}
}
