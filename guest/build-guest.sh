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
# shellcheck source=lib/guest-parts.sh
source "$repo/guest/lib/guest-parts.sh"
fetch_kernel linux-image-cloud-amd64 "$cache"

root=$out/initramfs
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,etc,tmp,lib/modules}
install_busybox "$root" sh mount umount insmod ip cat echo sleep poweroff mkdir ls dmesg grep \
  sed tr
install_modules "$root" "${modules[@]}"

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
