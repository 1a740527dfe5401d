#!/usr/bin/env bash
# The sanitizer runs of CI.
#
#   address   the whole suite (host pass, and the CUDA tests and normal-mode suite on the CUDA
#             backend executed on the CPU) against an AddressSanitizer + UndefinedBehaviorSanitizer
#             build of the CPU-executed flavour: host code and kernels instrumented. Deno itself is
#             not, so the runtimes are preloaded.
#   thread    tests/native/kernel_families.cpp (every kernel family, no Deno) against a
#             ThreadSanitizer build of the same flavour; any report fails.
#
# Usage: .ci/sanitize.sh address|thread
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
build() {
  SWITCHYARD_BUILD_DIR="$1" SWITCHYARD_SANITIZE="$2" \
    deno run --allow-run --allow-read --allow-env scripts/build.ts --cuda-cpu
}
case "${1:-}" in
  address)
    build "$root/build-asan" address,undefined
    LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
      ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \
      UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
      SWITCHYARD_LIBRARY="$root/build-asan/libswitchyard.so" \
      SWITCHYARD_CUDA_ON_CPU_LIBRARY="$root/build-asan/libswitchyard.so" \
      SWITCHYARD_TEST_PASSES=host,cuda-on-cpu \
      deno run --allow-ffi --allow-env --allow-read --allow-run --allow-write scripts/test.ts
    ;;
  thread)
    build "$root/build-tsan" thread
    # Every report counts: the run's exit status is 66 if there was one.
    TSAN_OPTIONS="halt_on_error=0 exitcode=66 second_deadlock_stack=1" \
      "$root/build-tsan/switchyard_kernel_families" --ranks 3 --tokens 24 --experts 12
    ;;
  *)
    echo "usage: .ci/sanitize.sh address|thread" >&2
    exit 2
    ;;
esac
