# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/demo.sh, from the repository root.
# build_qemu_parts: builds lockstep's QEMU (qemu-patches/build-qemu.sh) and the test guest
# (guest/build-guest.sh), both cached, logging to build/, and exports LOCKSTEP_CMAKE_ARGS so
# that scripts/build.sh configures CMake with them. `who` names the caller in messages.
build_qemu_parts() {
  local qemu guest
  mkdir -p build
  echo "== lockstep's QEMU (qemu-patches/build-qemu.sh; about 7 minutes the first time)"
  if ! qemu=$(qemu-patches/build-qemu.sh > build/qemu-build.log 2>&1 && tail -n 1 build/qemu-build.log); then
    tail -n 30 build/qemu-build.log >&2
    echo "${who:-lockstep}: building QEMU failed; the whole log is build/qemu-build.log" >&2
    return 1
  fi
  echo "== the test guest (guest/build-guest.sh)"
  if ! guest=$(guest/build-guest.sh > build/guest-build.log 2>&1 && tail -n 1 build/guest-build.log); then
    tail -n 30 build/guest-build.log >&2
    echo "${who:-lockstep}: building the guest failed; the whole log is build/guest-build.log" >&2
    return 1
  fi
  guest/build-rdma-guest.sh --fetch-only >> build/guest-build.log 2>&1 || { tail -n 30 build/guest-build.log >&2; echo "${who:-lockstep}: fetching the RDMA guest's kernel failed (guest/build-rdma-guest.sh)" >&2; return 1; }
  export LOCKSTEP_CMAKE_ARGS="-DLOCKSTEP_QEMU=$qemu -DLOCKSTEP_GUEST_DIR=$guest"
}
