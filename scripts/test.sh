#!/usr/bin/env bash
# The test command: installs what is missing, builds, and runs every test (ctest), then
# a short run of the epoch-decoder fuzzer. Exits non-zero on any failure.
#   LOCKSTEP_FUZZ_SECONDS  how long the fuzzer runs (default 30; 0 skips it)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --if-root
scripts/build.sh
echo "== ctest"
(cd build && ctest --output-on-failure --timeout 600 -j2)

fuzz_seconds=${LOCKSTEP_FUZZ_SECONDS:-30}
if ((fuzz_seconds > 0)); then
  echo "== fuzzing the epoch decoder for ${fuzz_seconds}s"
  CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DLOCKSTEP_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build build-fuzz --target epoch_decoder_fuzz
  corpus=build-fuzz/corpus
  mkdir -p "$corpus"
  build-fuzz/lockstep/epoch_decoder_fuzz -max_total_time="$fuzz_seconds" -print_final_stats=1 \
    "$corpus" 2>&1 | tail -n 4
  echo "fuzz: no crash in ${fuzz_seconds}s"
fi
