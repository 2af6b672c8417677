#!/usr/bin/env bash
# gotest.sh ARGS... runs `go test -v ARGS...` and shows what a plain `go test` shows, with
# each skipped test and its reason as well; any skip fails the run. `make setup` installs
# everything the tests need and CI runs as root, so a skip there is a test that silently
# did not run: name it instead. KILN_ALLOW_SKIP=1 lets skips pass (a host without root).
set -u
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"${GO:-go}" test -v "$@" 2>&1 | tee "$log" | grep -vE '^[[:space:]]*(=== (RUN|PAUSE|CONT|NAME) |--- PASS: )'
rc=${PIPESTATUS[0]}
skips=$(grep -cE '^[[:space:]]*--- SKIP: ' "$log")
if [ "$skips" -gt 0 ]; then
  echo "gotest: $skips test(s) skipped (listed above with their reasons):"
  grep -E '^[[:space:]]*--- SKIP: ' "$log"
  if [ "${KILN_ALLOW_SKIP:-}" = "" ]; then
    echo "gotest: a skip means a test did not run; install what it names (make setup), or set KILN_ALLOW_SKIP=1"
    [ "$rc" -ne 0 ] || rc=1
  fi
fi
exit "$rc"
