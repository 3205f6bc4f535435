#!/usr/bin/env bash
# The main job: installs what is missing, builds lockstep's QEMU (cached; about 7 minutes
# the first time), the test guest and the demo, and runs the failover demo: a real Linux
# guest in QEMU, protected across two hosts (network namespaces), survives kill -9 of its
# primary QEMU while a client on a third host keeps its TCP connection. Needs root.
# Usage: scripts/demo.sh [SECONDS_PROTECTED_BEFORE_THE_KILL] [--help | demo options...]
#        scripts/demo.sh --engine-only [SECONDS]   the engine alone with lockstep's simulated
#                                                  guest: no QEMU, no root
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --if-root
if [[ ${1:-} == --engine-only ]]; then
  shift
  scripts/build.sh lockstep_engine_demo
  exec build/demo/lockstep_engine_demo "$@"
fi
if [[ $(id -u) -ne 0 ]]; then
  # Said before building anything: the demo makes network namespaces and taps.
  echo "demo: must run as root (try: sudo $0; or $0 --engine-only without QEMU)" >&2
  exit 1
fi
who=demo
# shellcheck source=lib/qemu-parts.sh
source scripts/lib/qemu-parts.sh
build_qemu_parts
echo "== building the demo, lockstepd, lockstepctl, the engine plugin and the witness"
scripts/build.sh lockstep_qemu_demo lockstepd lockstepctl lockstep_plugin lockstep-witness
echo "== the demo"
exec build/demo/lockstep_qemu_demo "$@"
