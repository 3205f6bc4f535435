#!/usr/bin/env bash
# Builds lockstep's test guest: Debian's cloud kernel (downloaded as a package) and a
# busybox initramfs with the virtio-net modules and lockstep-workload (guest/workload.cc,
# statically linked). Writes vmlinuz and initrd.gz to $LOCKSTEP_GUEST_DIR (default
# build/guest) and prints that directory on its last line. Needs root the first time
# (Debian packages). Safe to run twice.
#
# The guest's /init reads from the kernel command line:
#   lockstep.ip=ADDR/PREFIX     address of eth0 (none: no network configured)
#   lockstep.args="..."         extra arguments for lockstep-workload
#   lockstep.tick               print "lockstep-tick UPTIME" on the console every second
# and prints LOCKSTEP-GUEST-READY on the console once the workload listens.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${LOCKSTEP_GUEST_DIR:-$repo/build/guest}
cache=${LOCKSTEP_GUEST_CACHE:-$repo/.cache/guest}
modules=(virtio_pci virtio_net)

deps=(busybox-static kmod cpio gzip build-essential)
who=build-guest
# shellcheck source=../scripts/lib/packages.sh
source "$repo/scripts/lib/packages.sh"
ensure_packages "${deps[@]}"

# The kernel: the package linux-image-cloud-amd64 currently points at.
mkdir -p "$cache"
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [[ -z $kpkg ]]; then
  echo "build-guest: cannot resolve linux-image-cloud-amd64 (run apt-get update as root)" >&2
  exit 1
fi
kdir=$cache/$kpkg
if [[ ! -d $kdir/boot ]]; then
  rm -rf "$cache/dl" && mkdir -p "$cache/dl"
  (cd "$cache/dl" && apt-get download -q "$kpkg" >/dev/null)
  rm -rf "$kdir.tmp" && mkdir -p "$kdir.tmp"
  dpkg-deb -x "$cache"/dl/"$kpkg"_*.deb "$kdir.tmp"
  mv "$kdir.tmp" "$kdir"
  rm -rf "$cache/dl"
fi
kver=$(ls "$kdir/lib/modules")
depmod -b "$kdir" "$kver"

root=$out/initramfs
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,etc,tmp,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for tool in sh mount umount insmod ip cat echo sleep poweroff mkdir ls dmesg grep sed tr; do
  ln -sf busybox "$root/bin/$tool"
done

# Modules in load order, dependencies first; built-in ones are skipped.
: > "$root/etc/modules.order"
for m in "${modules[@]}"; do
  modprobe -d "$kdir" -S "$kver" --show-depends "$m" | while read -r kind path _; do
    [[ $kind == insmod ]] || continue
    name=$(basename "$path")
    grep -qx "$name" "$root/etc/modules.order" && continue
    cp "$path" "$root/lib/modules/$name"
    echo "$name" >> "$root/etc/modules.order"
  done
done

g++ -std=c++20 -O2 -static -pthread -Wall -Wextra -Werror "$repo/guest/workload.cc" \
  -o "$root/bin/lockstep-workload"

cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m; done
ip=""
args=""
for word in $(cat /proc/cmdline); do
  case "$word" in
    lockstep.ip=*) ip="${word#lockstep.ip=}" ;;
  esac
done
args=$(sed -n 's/.*lockstep\.args="\([^"]*\)".*/\1/p' /proc/cmdline)
ip link set lo up
if [ -n "$ip" ]; then
  ip link set eth0 up
  ip addr add "$ip" dev eth0
fi
/bin/lockstep-workload $args &
sleep 0.2
echo LOCKSTEP-GUEST-READY
# lockstep.tick: a line on the console every second, to see that a guest runs.
if grep -q lockstep.tick /proc/cmdline; then
  while :; do echo "lockstep-tick $(cat /proc/uptime)"; sleep 1; done &
fi
while :; do sleep 3600; done
INIT
chmod +x "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initrd.gz"
cp "$kdir/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "build-guest: kernel $kver, modules: $(tr '\n' ' ' < "$root/etc/modules.order")initrd $(du -k "$out/initrd.gz" | cut -f1) KiB"
echo "$out"
