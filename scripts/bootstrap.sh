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

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  # Refresh the package lists unless they are less than a day old.
  if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit 2>/dev/null) ]]; then
    echo "bootstrap: refreshing Debian package lists"
    apt-get update -q
  fi
  echo "bootstrap: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "bootstrap: all ${#PACKAGES[@]} packages already installed"
fi
