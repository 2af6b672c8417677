# kiln: the two commands for a fresh Debian 12 host are `make demo` and `make test`.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
export CGO_ENABLED := 0
GO ?= go
# Where assets, disks and VM state live; tests use their own directories for VM state
# and share the asset cache.
export KILN_DATA_DIR ?= /var/lib/kiln
TEST_TIMEOUT ?= 25m

.PHONY: all setup deps build assets demo test test-fast test-firecracker fuzz bench clean

all: build

## setup: install packages and Go modules, build kiln, build the guest assets
setup: deps build assets

deps:
	./scripts/setup.sh

build: bin/buildkitd
	$(GO) build -o bin/kiln ./cmd/kiln
	$(GO) build -o bin/kiln-init ./cmd/kiln-init

# buildkitd for builder VMs, from the BuildKit release pinned in tools/buildkitd (a module
# of its own: BuildKit's exclude directives apply only in a main module).
BUILDKIT_VERSION := $(shell awk '$$1 == "require" && $$2 == "github.com/moby/buildkit" {print $$3}' tools/buildkitd/go.mod)
bin/buildkitd: tools/buildkitd/go.mod tools/buildkitd/go.sum
	cd tools/buildkitd && $(GO) build -trimpath -ldflags "-s -w -X github.com/moby/buildkit/version.Version=$(BUILDKIT_VERSION)" \
	  -o ../../bin/buildkitd github.com/moby/buildkit/cmd/buildkitd

assets: build
	./bin/kiln assets build

## demo: boot a microVM, run a command in it, get its exit status back
demo: setup
	@echo '$$ kiln vm run -- sh -c '"'"'echo hello from $$(uname -r); exit 3'"'"
	@./bin/kiln vm run --verbose -- sh -c 'echo hello from $$(uname -r); exit 3'; \
	  rc=$$?; echo "kiln vm run exited with status $$rc"; test $$rc -eq 3

## test: every test, fast and with real VMs; then Fly's own client against kiln
## (compat/flaps, a module of its own so that fly-go's dependencies stay out of kiln's).
## A skipped test fails the run and is named (scripts/gotest.sh; KILN_ALLOW_SKIP=1 lets
## skips pass on a host without root).
test: setup
	$(GO) vet ./...
	GO=$(GO) ./scripts/gotest.sh -count=1 -timeout $(TEST_TIMEOUT) -p 1 ./...
	cd compat/flaps && $(GO) vet ./... && GO=$(GO) ../../scripts/gotest.sh -count=1 -timeout 15m ./...

## test-firecracker: the Firecracker driver's suite and the server's end-to-end test on a
## real firecracker and jailer (FIRECRACKER=/path JAILER=/path, else both on PATH) and
## KVM. `make test` runs the same tests against fake-firecracker, which enforces
## Firecracker's API and the jailer's layout with QEMU behind it.
FIRECRACKER ?= $(shell command -v firecracker)
JAILER ?= $(shell command -v jailer)
test-firecracker: setup
	@if [ -z "$(FIRECRACKER)" ] || [ -z "$(JAILER)" ]; then \
	  echo "test-firecracker: firecracker and jailer are not on PATH: install both from Firecracker's release (github.com/firecracker-microvm/firecracker/releases), or give FIRECRACKER=/path JAILER=/path"; exit 2; fi
	@if [ ! -w /dev/kvm ]; then echo "test-firecracker: /dev/kvm is not usable here: Firecracker needs KVM (bare metal, or a VM with nested virtualization)"; exit 2; fi
	KILN_TEST_FIRECRACKER=$(FIRECRACKER) KILN_TEST_JAILER=$(JAILER) GO=$(GO) ./scripts/gotest.sh -count=1 -timeout 30m -p 1 \
	  -run 'TestConformance|TestServerEndToEndFirecracker' ./internal/vmm/firecracker ./cmd/kiln

## test-fast: the tests that need no VM
test-fast:
	$(GO) test -short -count=1 ./...

## fuzz: each fuzz target for FUZZTIME (`make test` runs only their seed corpora). Go
## fuzzes one target per run; a crash is saved under the package's testdata/fuzz/.
## FUZZFLAGS=-parallel=1 keeps it to one worker on a shared host.
FUZZTIME ?= 30s
FUZZFLAGS ?=
FUZZ_TARGETS := FuzzConvertLayer:./internal/image FuzzExtractContext:./internal/buildcontext FuzzDecode:./internal/server \
  FuzzReadFrame:./internal/guest
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
	  echo "== $${t%%:*} ($(FUZZTIME))"; \
	  $(GO) test -run '^$$' -fuzz "^$${t%%:*}$$" -fuzztime $(FUZZTIME) $(FUZZFLAGS) "$${t#*:}"; \
	done

## bench: boot (kiln's guest kernel and Debian's, in one run), exec and throughput figures
## as a table and JSON (bench-results/)
bench: setup
	$(GO) run ./cmd/kiln-bench -out bench-results/bench.json

clean:
	rm -rf bin bench-results
