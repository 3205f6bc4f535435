#!/usr/bin/env bash
# The test command: installs what is missing, builds lockstep, lockstep's QEMU (cached)
# and the test guest, runs every test (ctest), then a short run of the epoch-decoder
# fuzzer. Exits non-zero on any failure.
#   LOCKSTEP_FUZZ_SECONDS  how long the fuzzer runs (default 30; 0 skips it)
#   LOCKSTEP_SKIP_QEMU=1   leave out QEMU and the guest (and the tests that need them)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --if-root
if [[ ${LOCKSTEP_SKIP_QEMU:-0} != 1 ]]; then
  who="test"
  # shellcheck source=lib/qemu-parts.sh
  source scripts/lib/qemu-parts.sh
  build_qemu_parts
fi
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
