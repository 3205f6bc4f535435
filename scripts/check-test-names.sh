#!/usr/bin/env bash
# Fails if a Catch2 binary has a test name ctest cannot run: catch_discover_tests turns
# each name into a CMake list, so a name with ';' becomes several tests that match nothing
# and "pass" without running a line.
#   check-test-names.sh TEST_BINARY
set -euo pipefail
bad=$("$1" --list-test-names-only | grep ';' || true)
if [[ -n $bad ]]; then
  echo "$1: test names with ';' would never run under ctest; use ',' instead:" >&2
  echo "$bad" >&2
  exit 1
fi
echo "$1: every test name is whole"
