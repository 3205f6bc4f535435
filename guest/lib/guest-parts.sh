# shellcheck shell=bash
# Sourced by guest/build-guest.sh and guest/build-rdma-guest.sh: the steps both test guests
# share. `who` names the caller in messages.

# fetch_kernel META CACHE: downloads and unpacks (never installs) the kernel package META
# (linux-image-cloud-amd64, linux-image-amd64) points at, cached under CACHE; sets kdir
# (the unpacked tree) and kver (its version), with modules.dep made.
fetch_kernel() {
  local meta=$1 cache=$2 kpkg dl
  mkdir -p "$cache"
  kpkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  if [[ -z $kpkg ]]; then
    echo "$who: cannot resolve $meta (run apt-get update as root)" >&2
    return 1
  fi
  kdir=$cache/$kpkg
  if [[ ! -d $kdir/boot ]]; then
    dl=$cache/dl-$kpkg
    rm -rf "$dl" && mkdir -p "$dl"
    (cd "$dl" && apt-get download -q "$kpkg" >/dev/null)
    rm -rf "$kdir.tmp" && mkdir -p "$kdir.tmp"
    dpkg-deb -x "$dl"/"$kpkg"_*.deb "$kdir.tmp"
    mv "$kdir.tmp" "$kdir"
    rm -rf "$dl"
  fi
  kver=$(ls "$kdir/lib/modules")
  [[ -f $kdir/lib/modules/$kver/modules.dep ]] || depmod -b "$kdir" "$kver"
}

# install_busybox ROOT TOOL...: busybox in ROOT/bin with a link per TOOL.
install_busybox() {
  local root=$1 tool
  shift
  cp /bin/busybox "$root/bin/busybox"
  for tool in "$@"; do ln -sf busybox "$root/bin/$tool"; done
}

# install_modules ROOT MODULE...: the modules of $kdir/$kver and their dependencies in
# ROOT/lib/modules, their load order (dependencies first; built-in ones skipped) in
# ROOT/etc/modules.order.
install_modules() {
  local root=$1 m kind path name
  shift
  : > "$root/etc/modules.order"
  for m in "$@"; do
    modprobe -d "$kdir" -S "$kver" --show-depends "$m" | while read -r kind path _; do
      [[ $kind == insmod ]] || continue
      name=$(basename "$path")
      grep -qx "$name" "$root/etc/modules.order" && continue
      cp "$path" "$root/lib/modules/$name"
      echo "$name" >> "$root/etc/modules.order"
    done
  done
  # Compressed modules (some kernels ship .ko.xz) would need a decompressing insmod.
  if grep -qv '\.ko$' "$root/etc/modules.order"; then
    echo "$who: the kernel ships compressed modules; decompress them first" >&2
    return 1
  fi
}
