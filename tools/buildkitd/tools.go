//go:build tools

// Package buildkitd pins the BuildKit release whose buildkitd runs in kiln's builder
// VMs. It is a module of its own because BuildKit's go.mod carries exclude directives,
// which only a main module may apply (`go install …@version` refuses it); keeping it
// apart also keeps the daemon's dependencies out of kiln's own module.
package buildkitd

import _ "github.com/moby/buildkit/cmd/buildkitd"
