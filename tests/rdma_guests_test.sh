#!/usr/bin/env bash
# The RDMA transport over real verbs: two TCG guests running Debian's standard kernel with
# soft-RoCE (rdma_rxe on virtio-net), joined by a QEMU socket netdev on 127.0.0.1 (no
# traffic leaves the host's loopback). Guest A (10.77.0.1) first runs rdma_probe as the
# listener while guest B (10.77.0.2) connects and exchanges checked messages with it
# (real RoCE v2 traffic between two machines), then A runs the whole RDMA conformance
# suite on its own rxe0 (both ends of every pair on one device: rxe loops back).
# Fails unless both guests report success. Under TCG the figures printed are for
# diagnosis only: they say nothing of RDMA speed on hardware.
#
#   tests/rdma_guests_test.sh QEMU CONFORMANCE_BINARY PROBE_BINARY
# Registered with ctest as rdma_guests_test (replication-channel/CMakeLists.txt).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if (($# != 3)); then
  echo "usage: $0 QEMU CONFORMANCE_BINARY PROBE_BINARY" >&2
  exit 2
fi
qemu=$1
conformance=$2
probe=$3
for f in "$qemu" "$conformance" "$probe"; do
  [[ -x $f ]] || { echo "rdma_guests_test: $f is missing or not executable (build it first)" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/rdma-guests.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
show_log() {
  echo "---- last lines of guest $1's console ----"
  tail -n "${2:-40}" "$work/$1.log" | tr -d '\r' | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g'
}

# The guest: built from the binaries under test each time (the kernel is cached).
start=$(now)
guest_dir=$(dirname "$conformance")/rdma-guest
if ! LOCKSTEP_RDMA_GUEST_DIR=$guest_dir "$repo/guest/build-rdma-guest.sh" "$conformance" \
  "$probe" > "$work/build.log" 2>&1; then
  tail -n 30 "$work/build.log" >&2
  echo "rdma_guests_test: building the guest failed (guest/build-rdma-guest.sh)" >&2
  exit 1
fi
built=$(now)
echo "rdma_guests_test: guest built in $(elapsed "$start" "$built") s: $(tail -n 2 "$work/build.log" | head -n 1)"

# A free port on 127.0.0.1 for the netdev between the guests (A's QEMU listens).
port=""
for _ in $(seq 50); do
  candidate=$((20000 + RANDOM % 20000))
  if [[ -z $(ss -Htln "sport = :$candidate" 2>/dev/null) ]]; then
    port=$candidate
    break
  fi
done
[[ -n $port ]] || { echo "rdma_guests_test: no free port on 127.0.0.1" >&2; exit 1; }

probe_args="--count 64 --sizes 64,4096,65536,1048576,3000000 --timeout-seconds 300"
run_a="rdma_probe listen 10.77.0.1:7000 $probe_args; p=\$?;"
run_a+=" LOCKSTEP_RDMA_LISTEN=10.77.0.1:0 replication_channel_rdma_conformance -d yes; c=\$?;"
run_a+=" [ \$p = 0 ] && [ \$c = 0 ]"
run_b="rdma_probe connect 10.77.0.1:7000 $probe_args"

# launch NAME MEMORY_MIB SMP IP MAC NETDEV RUN
launch() {
  timeout 1200 "$qemu" -L /usr/share/qemu -L /usr/share/seabios -accel tcg -m "$2" -smp "$3" \
    -display none -monitor none -serial "file:$work/$1.log" -no-reboot \
    -kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initrd.cpio" \
    -append "console=ttyS0 quiet panic=-1 lockstep.ip=$4/24 lockstep.run=\"$7\"" \
    -device "virtio-net-pci,netdev=n0,romfile=,mac=$5" -netdev "socket,id=n0,$6" \
    < /dev/null > "$work/$1.qemu.log" 2>&1 &
  pids+=($!)
}

launched=$(now)
launch a 1536 2 10.77.0.1 52:54:00:77:00:01 "listen=127.0.0.1:$port" "$run_a"
pid_a=${pids[-1]}
# B's QEMU connects at start-up, so A's must listen first.
for _ in $(seq 100); do
  [[ -n $(ss -Htln "sport = :$port" 2>/dev/null) ]] && break
  kill -0 "$pid_a" 2>/dev/null || break
  sleep 0.1
done
launch b 512 1 10.77.0.2 52:54:00:77:00:02 "connect=127.0.0.1:$port" "$run_b"
pid_b=${pids[-1]}

rc_b=0
wait "$pid_b" || rc_b=$?
done_b=$(now)
rc_a=0
wait "$pid_a" || rc_a=$?
done_a=$(now)
pids=()

result() { tr -d '\r' < "$work/$1.log" | grep -a -o 'LOCKSTEP-RDMA-RESULT rc=[0-9]*.*' | tail -n 1; }
clean() { tr -d '\r' < "$work/$1.log" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g'; }
result_a=$(result a)
result_b=$(result b)

echo "rdma_guests_test: guest B ran $(elapsed "$launched" "$done_b") s (qemu exit $rc_b): ${result_b:-no result}"
clean b | grep -a -E '^(link rxe0|lockstep-rdma: up|rdma_probe:)' | sed 's/^/  B| /' || true
echo "rdma_guests_test: guest A ran $(elapsed "$launched" "$done_a") s (qemu exit $rc_a): ${result_a:-no result}"
clean a | grep -a -E '^(link rxe0|lockstep-rdma: up|rdma_probe:|All tests passed|test cases:|[0-9.]+ s: )' |
  sed 's/^/  A| /' || true

failed=0
if [[ $result_b != "LOCKSTEP-RDMA-RESULT rc=0"* ]] || ! clean b | grep -aq '^rdma_probe: connect ok'; then
  echo "rdma_guests_test: FAILED: the probe in guest B did not succeed" >&2
  show_log b >&2
  failed=1
fi
if [[ $result_a != "LOCKSTEP-RDMA-RESULT rc=0"* ]] || ! clean a | grep -aq '^rdma_probe: listen ok' ||
  ! clean a | grep -aq 'All tests passed'; then
  echo "rdma_guests_test: FAILED: the probe or the conformance suite in guest A did not succeed" >&2
  show_log a 80 >&2
  failed=1
fi
if ((failed)); then exit 1; fi
echo "rdma_guests_test: PASSED: probe between two guests and conformance suite over soft-RoCE, $(elapsed "$start" "$(now)") s in all"
