#!/usr/bin/env bash
# Builds the RDMA test guest: Debian's STANDARD kernel (the one linux-image-amd64 depends
# on; the cloud kernel has no rdma_rxe), downloaded as a package and unpacked, never
# installed, and a busybox initramfs with soft-RoCE (rdma_rxe, ib_uverbs and their
# dependencies), the iproute2 `rdma` tool, libibverbs with the rxe provider, and the
# programs given as arguments (dynamically linked ones are fine: every library ldd names
# is copied along). Writes vmlinuz and initrd.gz to $LOCKSTEP_RDMA_GUEST_DIR (default
# build/rdma-guest) and prints that directory on its last line. Needs root the first time
# (Debian packages). Safe to run twice: the kernel is cached in .cache/guest.
#
#   guest/build-rdma-guest.sh [--fetch-only] [PROGRAM...]
#     --fetch-only   only install the packages and download the kernel (for build steps)
#     PROGRAM        copied to /bin/ of the guest under its own name
#
# The guest's /init reads from the kernel command line:
#   lockstep.ip=ADDR/PREFIX    address of eth0 (none: no network, no rxe0)
#   lockstep.run="COMMAND"     run by sh once rxe0 is up; no double quotes inside
# then prints "LOCKSTEP-RDMA-RESULT rc=N uptime=SECONDS" (N: COMMAND's exit status; 125
# when soft-RoCE could not be set up) on the console and powers the guest off.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${LOCKSTEP_RDMA_GUEST_DIR:-$repo/build/rdma-guest}
cache=${LOCKSTEP_GUEST_CACHE:-$repo/.cache/guest}
# crc32_generic: rxe asks the crypto API for "crc32" at run time, and without modprobe in
# the guest nothing would load it. ib_uverbs: /dev/infiniband/uverbs* for libibverbs.
modules=(virtio_pci virtio_net crc32_generic rdma_rxe ib_uverbs)

fetch_only=0
if [[ ${1:-} == --fetch-only ]]; then
  fetch_only=1
  shift
fi

deps=(busybox-static kmod cpio binutils iproute2 libibverbs1 ibverbs-providers)
# shellcheck disable=SC2034  # read by ensure_packages
who=build-rdma-guest
# shellcheck source=../scripts/lib/packages.sh
source "$repo/scripts/lib/packages.sh"
ensure_packages "${deps[@]}"

# The kernel: the package linux-image-amd64 currently points at.
# shellcheck source=lib/guest-parts.sh
source "$repo/guest/lib/guest-parts.sh"
fetch_kernel linux-image-amd64 "$cache"
if ((fetch_only)); then
  echo "build-rdma-guest: kernel $kver cached in $kdir"
  echo "$out"
  exit 0
fi

root=$out/initramfs
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,etc/libibverbs.d,tmp,lib/modules}
install_busybox "$root" sh mount insmod ip cat cut echo sleep poweroff mkdir ls dmesg grep sed \
  tr seq
install_modules "$root" "${modules[@]}"

# Copies a file to the same path under the initramfs (following symlinks).
copy_file() {
  mkdir -p "$root$(dirname "$1")"
  cp -L "$1" "$root$1"
}
# Copies every library `ldd` names for $1 (and the dynamic loader).
copy_libraries() {
  local lib
  for lib in $(ldd "$1" | awk '/=> \//{print $3} /^\t\//{print $1}'); do
    [[ -e $root$lib ]] || copy_file "$lib"
  done
}

# libibverbs loads its provider from libibverbs/ next to it, named by the .driver files.
multiarch=$(dirname "$(readlink -f "$(ldconfig -p | awk '/libibverbs.so.1 /{print $NF; exit}')")")
provider=$multiarch/libibverbs/librxe-rdmav34.so
if [[ ! -e $provider ]]; then
  echo "build-rdma-guest: $provider is missing (package ibverbs-providers)" >&2
  exit 1
fi
copy_file "$provider"
copy_libraries "$provider"
cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"
copy_file /usr/bin/rdma
copy_libraries /usr/bin/rdma
# Without debug information: a smaller initramfs unpacks faster under TCG.
for program in "$@"; do
  strip --strip-debug -o "$root/bin/$(basename "$program")" "$program"
  copy_libraries "$program"
done
# The loader looks in /lib64 and the multiarch directories on its own; ld.so.cache is not
# needed for them.

cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules.order); do
  insmod /lib/modules/$m || echo "lockstep-rdma: insmod $m failed"
done
ip=""
for word in $(cat /proc/cmdline); do
  case "$word" in
    lockstep.ip=*) ip="${word#lockstep.ip=}" ;;
  esac
done
run=$(sed -n 's/.*lockstep\.run="\([^"]*\)".*/\1/p' /proc/cmdline)
ip link set lo up
rc=0
if [ -n "$ip" ]; then
  ip link set eth0 up
  ip addr add "$ip" dev eth0
  if ! rdma link add rxe0 type rxe netdev eth0; then
    echo "lockstep-rdma: rdma link add rxe0 failed"
    rc=125
  fi
  # The port turns ACTIVE once eth0 has a carrier.
  for i in $(seq 50); do
    rdma link show rxe0/1 2>/dev/null | grep -q ACTIVE && break
    sleep 0.1
  done
  rdma link show
fi
if [ $rc -eq 0 ] && [ -n "$run" ]; then
  echo "lockstep-rdma: up after $(cut -d' ' -f1 /proc/uptime) s, running: $run"
  sh -c "$run"
  rc=$?
fi
echo "LOCKSTEP-RDMA-RESULT rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
INIT
chmod +x "$root/init"

# Uncompressed: the guest's kernel unpacks a plain cpio faster under TCG than a gzip one.
(cd "$root" && find . | cpio -o -H newc --quiet) > "$out/initrd.cpio"
cp "$kdir/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "build-rdma-guest: kernel $kver, modules: $(tr '\n' ' ' < "$root/etc/modules.order")initrd $(du -k "$out/initrd.cpio" | cut -f1) KiB"
echo "$out"
