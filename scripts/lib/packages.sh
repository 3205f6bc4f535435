# Sourced by the build scripts. ensure_packages PKG...: installs the Debian packages that
# are missing (as root), or says which ones and fails (otherwise). `who` names the caller.
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "${who:-lockstep}: missing Debian packages ${missing[*]}; run as root to install them" >&2
    return 1
  fi
  # Refresh the package lists unless they are less than a day old.
  if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit 2>/dev/null) ]]; then
    apt-get update -q
  fi
  echo "${who:-lockstep}: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}
