#!/usr/bin/env bash
# The sanitizer runs of CI, on builds of the CUDA backend executed on the CPU (host code and
# kernels instrumented alike).
#
#   address   the whole suite (host pass, and the CUDA tests and normal-mode suite on the
#             CPU-executed CUDA backend) against an AddressSanitizer + UndefinedBehaviorSanitizer
#             build in build-asan/. Deno itself is not instrumented, so the runtimes are preloaded.
#             Not tests/jsr_test.ts and tests/fresh_clone_test.ts: they build and load libraries
#             of their own; nor tests/bench_test.ts and tests/demo_test.ts: they drive the same
#             operations as the rest through the benchmark and the demo, and cost the lane a
#             minute (the plain passes run them).
#   thread    tests/native/kernel_families.cpp (every kernel family, no Deno; deadlines of 120 s: the
#             lane runs at low priority and can be starved for tens of seconds) and
#             tests/native/rdma_transport.cu (the CPU proxy, on the emulated NIC and through the ibverbs
#             engine on the software NIC) against a ThreadSanitizer build in
#             build-tsan/; any report fails the run.
#
# Usage: .ci/sanitize.sh build|run address|thread   (build both first: `build address thread`)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
action="${1:-}"
shift || true
[ "$action" = build ] || [ "$action" = run ] || { echo "usage: .ci/sanitize.sh build|run address|thread" >&2; exit 2; }
for kind in "$@"; do
  case "$action:$kind" in
    build:address | build:thread)
      flags=address,undefined
      [ "$kind" = thread ] && flags=thread
      dir="$root/build-asan"
      [ "$kind" = thread ] && dir="$root/build-tsan"
      # Only what each run uses: the library and the native test programs (address), the library
      # and the kernel-family driver (thread).
      targets=switchyard,switchyard_barrier_slots,switchyard_segment_checks,switchyard_hostile_counts,switchyard_cuda_ipc,switchyard_rdma_transport
      [ "$kind" = thread ] && targets=switchyard,switchyard_kernel_families,switchyard_rdma_transport
      SWITCHYARD_BUILD_DIR="$dir" SWITCHYARD_SANITIZE="$flags" SWITCHYARD_BUILD_TARGETS="$targets" \
        deno run --allow-run --allow-read --allow-env scripts/build.ts --cuda-cpu
      ;;
    run:address)
      LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
        ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \
        UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        SWITCHYARD_LIBRARY="$root/build-asan/libswitchyard.so" \
        SWITCHYARD_CUDA_ON_CPU_LIBRARY="$root/build-asan/libswitchyard.so" \
        SWITCHYARD_TEST_PASSES=host,cuda-on-cpu \
        SWITCHYARD_FAULT_JOBS=6 SWITCHYARD_FAULT_TIMEOUT_MS=2000 \
        SWITCHYARD_TEST_IGNORE=tests/jsr_test.ts,tests/fresh_clone_test.ts,tests/bench_test.ts,tests/demo_test.ts \
        deno run --allow-ffi --allow-env --allow-read --allow-run --allow-write scripts/test.ts
      ;;
    run:thread)
      # Every report counts: the run's exit status is 66 if there was one.
      TSAN_OPTIONS="halt_on_error=0 exitcode=66 second_deadlock_stack=1" \
        "$root/build-tsan/switchyard_kernel_families" --ranks 3 --tokens 24 --experts 12 --timeout-ms 120000 &&
        TSAN_OPTIONS="halt_on_error=0 exitcode=66 second_deadlock_stack=1" "$root/build-tsan/switchyard_rdma_transport" --emulated &&
        TSAN_OPTIONS="halt_on_error=0 exitcode=66 second_deadlock_stack=1" "$root/build-tsan/switchyard_rdma_transport" --ibverbs &&
        SOFT_VERBS_LINK_LAYER=ethernet TSAN_OPTIONS="halt_on_error=0 exitcode=66 second_deadlock_stack=1" \
          "$root/build-tsan/switchyard_rdma_transport" --roce
      ;;
    *)
      echo "usage: .ci/sanitize.sh build|run address|thread" >&2
      exit 2
      ;;
  esac
done
