#!/usr/bin/env bash
# Configures and builds lockstep in ./build (Release with debug info, Ninja).
# Usage: scripts/build.sh [TARGET...]   (default: everything)
#   LOCKSTEP_CMAKE_ARGS  extra arguments for cmake's configure step
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  echo "build: cmake and ninja are missing; run scripts/bootstrap.sh first (as root)" >&2
  exit 1
fi
# shellcheck disable=SC2086  # word splitting of the extra arguments is intended
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo ${LOCKSTEP_CMAKE_ARGS:-} >/dev/null
if (($#)); then
  cmake --build build --target "$@"
else
  cmake --build build
fi
