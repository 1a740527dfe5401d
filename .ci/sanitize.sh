#!/usr/bin/env bash
# The test suite against an AddressSanitizer + UndefinedBehaviorSanitizer build of the host
# code (CUDA off). Deno itself is not instrumented, so the runtimes are preloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
SWITCHYARD_BUILD_DIR="$root/build-asan" SWITCHYARD_CUDA=OFF SWITCHYARD_SANITIZE=address,undefined \
  deno run --allow-run --allow-read --allow-env scripts/build.ts
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  SWITCHYARD_LIBRARY="$root/build-asan/libswitchyard.so" \
  deno test --allow-ffi --allow-env --allow-read --allow-run --allow-write --allow-net tests/
