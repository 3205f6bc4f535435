#!/usr/bin/env bash
# Builds lockstep's QEMU: Debian's QEMU 7.2 source package, plus the patch series in
# qemu-patches/series/ (applied in file-name order with patch -p1), configured for TCG on
# x86_64 only, with replication (so stock COLO can be measured with the same binary), and
# with -Werror: QEMU and the series build without a warning on Debian's gcc.
#
# The build is cached under $LOCKSTEP_QEMU_CACHE (default: .cache/qemu in the repository)
# keyed on the series and the configure flags: changing the engine never rebuilds QEMU.
# Prints the path of qemu-system-x86_64 on its last line. Needs root the first time
# (Debian packages and the deb-src list). Safe to run twice.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${LOCKSTEP_QEMU_CACHE:-$repo/.cache/qemu}
series_dir=$repo/qemu-patches/series
configure_flags=(--target-list=x86_64-softmmu --without-default-features --enable-slirp
  --enable-fdt=system --enable-replication --disable-docs --enable-werror)

shopt -s nullglob
patches=("$series_dir"/*.patch)
abi_header=$repo/lockstep/include/lockstep/plugin_abi.h
key=$( { printf '%s\n' "${configure_flags[@]}"; cat "$abi_header"
  ((${#patches[@]})) && cat "${patches[@]}"; true; } | sha256sum | cut -c1-16)
out=$cache/build-$key
binary=$out/build/qemu-system-x86_64
if [[ -x $binary ]]; then
  echo "build-qemu: cached build $key"
  echo "$binary"
  exit 0
fi

# The last two are firmware (SeaBIOS, option ROMs): Debian's QEMU source is DFSG-clean and
# ships none. Run the binary with -L /usr/share/qemu -L /usr/share/seabios.
deps=(build-essential meson ninja-build pkg-config libglib2.0-dev libpixman-1-dev libslirp-dev
  libfdt-dev python3-venv flex bison dpkg-dev qemu-system-data seabios)
who=build-qemu
# shellcheck source=../scripts/lib/packages.sh
source "$repo/scripts/lib/packages.sh"
ensure_packages "${deps[@]}"

pristine=$cache/src/qemu-src
if [[ ! -d $pristine ]]; then
  # Debian ships only binary package lists by default: add the matching source lists.
  src_list=/etc/apt/sources.list.d/lockstep-deb-src.sources
  if [[ ! -f $src_list ]]; then
    if [[ $(id -u) -ne 0 ]]; then
      echo "build-qemu: need root once to add $src_list (Debian source package lists)" >&2
      exit 1
    fi
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$src_list"
    apt-get update -q
  fi
  mkdir -p "$cache/src"
  rm -rf "$cache/src/tmp" && mkdir -p "$cache/src/tmp"
  (cd "$cache/src/tmp" && apt-get source --download-only -q qemu &&
    dpkg-source -x qemu_*.dsc qemu-src >/dev/null)
  mv "$cache/src/tmp/qemu-src" "$pristine"
  rm -rf "$cache/src/tmp"
fi
version=$(cd "$pristine" && dpkg-parsechangelog -S Version)
echo "build-qemu: Debian qemu $version, series key $key"

rm -rf "$out"
mkdir -p "$out"
cp -a "$pristine" "$out/qemu"
for p in "${patches[@]}"; do
  echo "build-qemu: applying $(basename "$p")"
  if ! patch -p1 -s -d "$out/qemu" < "$p"; then
    echo "build-qemu: $(basename "$p") does not apply to Debian qemu $version" >&2
    exit 1
  fi
done
# The one engine header QEMU's side includes: the plugin C ABI.
mkdir -p "$out/qemu/include/lockstep"
cp "$abi_header" "$out/qemu/include/lockstep/plugin_abi.h"
mkdir -p "$out/build"
# Debian's python3 and meson, not a python3 that may sit earlier on PATH (pyenv).
(cd "$out/build" && PATH=/usr/bin:$PATH ../qemu/configure "${configure_flags[@]}" >configure.log 2>&1) || {
  echo "build-qemu: configure failed; see $out/build/configure.log" >&2
  tail -n 20 "$out/build/configure.log" >&2
  exit 1
}
# The build dir must be qemu/build for some QEMU scripts; a sibling works with configure.
PATH=/usr/bin:$PATH ninja -C "$out/build" qemu-system-x86_64
echo "$binary"
