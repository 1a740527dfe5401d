#!/usr/bin/env bash
# Puts the headers the transports compile against into the project, for compile checks only:
#   .tools/nccl/include    Debian's libnccl-dev (sid contrib): the NCCL device API (GIN)
#   .tools/verbs/include   Debian's libibverbs-dev (sid main): ibverbs, for the proxy's NIC engine
# Each is found through the package index of the machine's own Debian mirror (the URIs line of
# its apt sources), checked against the index's SHA256 and unpacked into the project. The
# system's apt sources are not touched, and neither library is loaded here: libnccl needs a
# newer glibc than this machine has, and libibverbs is opened by dlopen where a NIC exists.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
have() { [ -f "$root/.tools/nccl/include/nccl_device.h" ] && [ -f "$root/.tools/verbs/include/infiniband/verbs.h" ]; }
have && exit 0
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  mirror="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /debian\/?$/) { print $i; exit } }' "$f")"
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/ && $i ~ /debian\/?$/) { print $i; exit } }' /etc/apt/sources.list)"
fi
[ -n "$mirror" ] || { echo "fetch-headers: no Debian mirror in the apt sources" >&2; exit 1; }
mirror="${mirror%/}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# fetch PACKAGE COMPONENT DEST: the package's usr/include from sid's COMPONENT into DEST/include.
fetch() {
  local package="$1" component="$2" dest="$3"
  [ -f "$tmp/$component.Packages" ] || {
    curl -fsSL --retry 3 "$mirror/dists/sid/$component/binary-amd64/Packages.xz" -o "$tmp/$component.xz"
    xz -dc "$tmp/$component.xz" > "$tmp/$component.Packages"
  }
  local entry file sum version
  entry="$(awk -v p="Package: $package" '$0 == p { on = 1 } on && /^$/ { exit } on' "$tmp/$component.Packages")"
  file="$(printf '%s\n' "$entry" | awk '/^Filename:/ { print $2 }')"
  sum="$(printf '%s\n' "$entry" | awk '/^SHA256:/ { print $2 }')"
  version="$(printf '%s\n' "$entry" | awk '/^Version:/ { print $2 }')"
  [ -n "$file" ] && [ -n "$sum" ] || { echo "fetch-headers: $package not in sid $component" >&2; exit 1; }
  curl -fsSL --retry 3 "$mirror/$file" -o "$tmp/$package.deb"
  echo "$sum  $tmp/$package.deb" | sha256sum -c --quiet
  rm -rf "$tmp/x" && mkdir -p "$tmp/x" "$dest"
  dpkg-deb --fsys-tarfile "$tmp/$package.deb" | tar -x -C "$tmp/x" --wildcards './usr/include/*'
  rm -rf "$dest/include"
  cp -r "$tmp/x/usr/include" "$dest/include"
  echo "$package $version headers in $dest/include"
}

[ -f "$root/.tools/nccl/include/nccl_device.h" ] || fetch libnccl-dev contrib "$root/.tools/nccl"
[ -f "$root/.tools/verbs/include/infiniband/verbs.h" ] || fetch libibverbs-dev main "$root/.tools/verbs"
