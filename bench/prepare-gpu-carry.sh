#!/usr/bin/env bash
# Prepares what bench/gpu-check.sh needs on a GPU machine that cannot fetch anything: the pinned
# Deno npm tarball (the binary itself is too large to travel), in .carry/ (git-ignored). Run it
# here, then pass `carry: [".carry"]` to the device call.
set -euo pipefail
version="${DENO_VERSION:-2.9.6}"
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$root/.carry"
cd "$root/.carry"
[ -f "deno-linux-x64-glibc-$version.tgz" ] || npm pack --silent "@deno/linux-x64-glibc@$version" >/dev/null
ls -la "$root/.carry"
