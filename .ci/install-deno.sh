#!/usr/bin/env bash
# Installs the pinned Deno into .tools/deno from the npm package @deno/linux-x64-glibc (the
# tarball's package/deno is the binary; npm is only the delivery channel).
set -euo pipefail
version="${DENO_VERSION:-2.9.6}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.tools/deno"
if [ -x "$dest/deno" ] && "$dest/deno" --version | head -n1 | grep -q "^deno $version "; then
  exit 0
fi
command -v npm >/dev/null || { echo "install-deno: npm is needed to fetch @deno/linux-x64-glibc" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@deno/linux-x64-glibc@$version" >/dev/null)
mkdir -p "$dest"
tar -xzf "$tmp"/deno-linux-x64-glibc-"$version".tgz -C "$dest" --strip-components=1 package/deno
chmod +x "$dest/deno"
"$dest/deno" --version | head -n1
