#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs the failover demo — a protected
# guest whose primary is killed with SIGKILL while a client watches its output.
# Usage: scripts/demo.sh [SECONDS_PROTECTED_BEFORE_THE_KILL]
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -eq 0 ]]; then
  scripts/bootstrap.sh
else
  echo "demo: not root, so not installing packages; if the build fails, run scripts/bootstrap.sh as root" >&2
fi
scripts/build.sh lockstep_engine_demo
exec build/demo/lockstep_engine_demo "$@"
