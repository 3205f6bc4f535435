#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs the failover demo — a protected
# guest whose primary is killed with SIGKILL while a client watches its output.
# Usage: scripts/demo.sh [SECONDS_PROTECTED_BEFORE_THE_KILL]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --if-root
scripts/build.sh lockstep_engine_demo
exec build/demo/lockstep_engine_demo "$@"
