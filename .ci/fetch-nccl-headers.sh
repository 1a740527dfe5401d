#!/usr/bin/env bash
# Puts NCCL's headers into .tools/nccl/include, for compile checks only: Debian's libnccl-dev
# from sid contrib, found through the package index of the machine's own Debian mirror (the
# URIs line of its apt sources), checked against the index's SHA256, unpacked into the project.
# The system's apt sources are not touched; the library itself (it needs a newer glibc than
# this machine has) is never loaded here.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.tools/nccl"
if [ -f "$dest/include/nccl.h" ] && [ -f "$dest/include/nccl_device.h" ]; then
  exit 0
fi
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  mirror="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /debian\/?$/) { print $i; exit } }' "$f")"
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/ && $i ~ /debian\/?$/) { print $i; exit } }' /etc/apt/sources.list)"
fi
[ -n "$mirror" ] || { echo "fetch-nccl-headers: no Debian mirror in the apt sources" >&2; exit 1; }
mirror="${mirror%/}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
curl -fsSL --retry 3 "$mirror/dists/sid/contrib/binary-amd64/Packages.xz" -o "$tmp/Packages.xz"
xz -dc "$tmp/Packages.xz" > "$tmp/Packages"
entry="$(awk '/^Package: libnccl-dev$/ { on = 1 } on && /^$/ { exit } on' "$tmp/Packages")"
file="$(printf '%s\n' "$entry" | awk '/^Filename:/ { print $2 }')"
sum="$(printf '%s\n' "$entry" | awk '/^SHA256:/ { print $2 }')"
version="$(printf '%s\n' "$entry" | awk '/^Version:/ { print $2 }')"
[ -n "$file" ] && [ -n "$sum" ] || { echo "fetch-nccl-headers: libnccl-dev not in sid contrib" >&2; exit 1; }
curl -fsSL --retry 3 "$mirror/$file" -o "$tmp/nccl.deb"
echo "$sum  $tmp/nccl.deb" | sha256sum -c --quiet
mkdir -p "$tmp/x" "$dest"
dpkg-deb --fsys-tarfile "$tmp/nccl.deb" | tar -x -C "$tmp/x" --wildcards './usr/include/*'
rm -rf "$dest/include"
cp -r "$tmp/x/usr/include" "$dest/include"
echo "NCCL headers $version in $dest/include"
