#!/usr/bin/env bash
# Installs every Debian package lockstep's build, tests and benchmarks need.
# Usage: scripts/bootstrap.sh [--if-root]   (--if-root: do nothing, successfully, unless root)
# Safe to run twice: apt-get skips what is installed; the package lists are refreshed
# only when they are older than a day or missing.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  catch2                          # unit and integration tests
  libisal-dev                     # CRC32C (crc32_iscsi) for the wire format
  libboost-dev libboost-program-options-dev
  nlohmann-json3-dev              # QMP (JSON) in the QEMU test bed
  libnl-route-3-dev               # rtnetlink: the virtual IP (vip-manager)
  libssl-dev                      # libcrypto's base64 for etcd's JSON API (etcd witness)
  etcd-server                     # /usr/bin/etcd: the etcd witness's tests run a real one
  libdpdk-dev                     # the DPDK transport (EAL, memif and af_packet vdevs)
  libibverbs-dev rdma-core ibverbs-providers  # the RDMA transport (verbs; rxe in test guests)
  clang libclang-rt-14-dev        # libFuzzer target for the epoch decoder
  python3-matplotlib              # PNG plots of benchmark results
  iproute2 procps
)

if [[ $(id -u) -ne 0 ]]; then
  if [[ ${1:-} == --if-root ]]; then
    # Called by the other scripts: without root, build with what is there.
    echo "bootstrap: not root, so not installing packages; if the build fails, run $0 as root" >&2
    exit 0
  fi
  echo "bootstrap: must run as root to install Debian packages (try: sudo $0)" >&2
  exit 1
fi

who=bootstrap
# shellcheck source=lib/packages.sh
source "$(dirname "$0")/lib/packages.sh"
ensure_packages "${PACKAGES[@]}"
echo "bootstrap: all ${#PACKAGES[@]} packages installed"
