#!/usr/bin/env bash
# The GPU check, one call on a machine with one NVIDIA GPU (Hopper or newer, CUDA 13, Python's
# nvidia-nccl-cu13 wheel for NCCL's headers and library; nothing can be fetched there), in the
# order of what a short lease must not miss:
#
#   1. builds the library, the benchmark and the kernel-family driver with the CUDA backend (sm_90),
#   2. runs the demo (8 virtual ranks) and tests/native/kernel_families.cpp (one scenario per
#      kernel family through the C ABI, compared with the host backend),
#   3. benchmarks dispatch and combine: 8 virtual ranks x 4096 tokens x hidden 7168, top-8 of 256
#      experts, BF16 and FP8, against the GPU's copy bandwidth and a naive baseline
#      (bench/gpu_bench.cu), and the low-latency mode at decode shapes, 128 and 1 tokens per rank,
#      per rank median and p99 next to the bound of the copy bandwidth (bench/ll_bench.cu); both
#      write their JSON; then `deno task bench` and `deno bench` (bench/cuda_bench.ts: each
#      operation next to a device-to-device copy of its bytes, timed by CUDA events), and the two
#      hops across 2 virtual nodes of 4 (the proxy, the NIC stream, the network kernels),
#   4. runs the CUDA tests (tests/cuda_test.ts: every normal-mode case against the host backend,
#      bit for bit, plus the failure cases) and compute-sanitizer memcheck on the benchmark's
#      one-rank case (the sanitizer runs one kernel at a time, so ranks that wait for each other
#      cannot),
#   5. times the same shape with 2 and 8 ranks as virtual ranks and as one process each, all on
#      the one GPU (bench/process_bench.ts: the same script both ways, so the figures compare),
#   6. runs the normal-mode and low-latency suites with the fixture on the GPU and the
#      process-group tests,
#   7. bootstraps NCCL (the wheel's library) for 1 process, and for 2 on the one GPU, where NCCL
#      refuses and the group must go on without it (tests/mp/nccl_bootstrap.ts),
#   8. runs compute-sanitizer racecheck and synccheck.
#
# `--no-gpu` runs every step that makes sense without a device against the CUDA backend executed
# on the CPU (SWITCHYARD_CUDA=CPU, tests/cuda_on_cpu): the build, the tests, the driver, and the
# benchmark's correctness checks at small sizes in every configuration the GPU run uses. CI runs
# it, so the day a GPU is lent this script cannot fail on its own bugs (with
# SWITCHYARD_GPU_CHECK_SUITE_RAN=WHERE it leaves out the suite CI's test command has just run).
#
# Everything lands in $OUT (default bench/out): gpu-check.log, env.txt, gpu_bench.json,
# ll_bench.json, process_bench.txt (one JSON line per rank and case). Every
# step has its own time limit and the whole script ends within its budget
# (SWITCHYARD_GPU_CHECK_BUDGET, default 540 s: a step that would outrun it gets what is left, and
# one that finds under 10 s left is skipped); the exit code is the number of failed or skipped
# steps. Before the GPU call: `bash bench/prepare-gpu-carry.sh` here, then run
# with carry [".carry"], e.g. `bash bench/gpu-check.sh` with timeout_s 600.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
gpu=1
case "${1:-}" in
  --no-gpu) gpu=0 ;;
  "") ;;
  *) echo "usage: bash bench/gpu-check.sh [--no-gpu]" >&2; exit 2 ;;
esac
out="${OUT:-$root/bench/out}"
mkdir -p "$out"
log="$out/gpu-check.log"
: >"$log"
failed=0
summary=()

note() { printf '%s\n' "$*" | tee -a "$log"; }
# The whole script's budget: a step gets what is left of it when that is less than its own limit,
# and is skipped (counted as failed) when under 10 s are left, so the call always returns.
budget="${SWITCHYARD_GPU_CHECK_BUDGET:-540}"
# step NAME SECONDS COMMAND...: runs with a time limit, logs, records the outcome.
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((budget - SECONDS))
  if [ $left -lt 10 ]; then
    summary+=("SKIPPED         $name (the ${budget}s budget is spent)")
    failed=$((failed + 1))
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  note ""
  note "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then
    summary+=("ok      ${took}s  $name")
  else
    summary+=("FAILED  ${took}s  $name (exit $rc)")
    failed=$((failed + 1))
  fi
  tail -n 25 "$log" | sed 's/^/    /'
  return $rc
}

# Tools: Deno from the carried tarball (or PATH), NCCL's headers from the Python wheel if any.
deno_tgz="$(ls "$root"/.carry/deno-linux-x64-glibc-*.tgz 2>/dev/null | head -n1)"
if [ -z "$deno_tgz" ] && ! command -v deno >/dev/null; then
  note "gpu-check: no Deno: run bench/prepare-gpu-carry.sh here and carry .carry"
  exit 1
fi
if [ -n "$deno_tgz" ]; then
  mkdir -p /tmp/deno-bin
  tar -xzf "$deno_tgz" -C /tmp/deno-bin --strip-components=1 package/deno
  export PATH="/tmp/deno-bin:$PATH"
  export DENO_NO_UPDATE_CHECK=1
fi
nccl_root=""
if command -v python3 >/dev/null; then
  # nvidia.nccl may be a namespace package (no __file__): take its first path.
  nccl_root="$(python3 -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)"
fi
[ -f "$nccl_root/include/nccl.h" ] || nccl_root=""
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  # The device's copy of .git may lag the working tree it was sent with: the hash of what the
  # library is built from says which tree ran (the same command in a checkout gives it).
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "sources: $(find csrc src ffi CMakeLists.txt -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
  if [ $gpu -eq 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  else
    echo "gpu: none (--no-gpu: the CUDA backend executed on the CPU)"
  fi
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n1)"
  if [ -n "$nccl_root" ]; then
    echo "nccl: $(python3 -c 'import importlib.metadata as m; print(m.version("nvidia-nccl-cu13"))' 2>/dev/null) ($nccl_root)"
  else
    echo "nccl: none"
  fi
  echo "deno: $(deno --version | head -n1)"
  echo "cuda_visible_devices: ${CUDA_VISIBLE_DEVICES:-all}"
} >"$out/env.txt" 2>&1
tee -a "$log" <"$out/env.txt"
# One GPU: the virtual ranks share it, and the benchmark compares events of one device.
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
[ -n "$nccl_root" ] && export SWITCHYARD_NCCL_ROOT="$nccl_root"
test_permissions=(--allow-ffi --allow-env --allow-read --allow-run --allow-write)
bench_permissions=(--allow-ffi --allow-env --allow-read --allow-write --allow-sys=osRelease,systemMemoryInfo,cpus)


nccl_lib=""
[ -n "$nccl_root" ] && [ -f "$nccl_root/lib/libnccl.so.2" ] && nccl_lib="$nccl_root/lib/libnccl.so.2"
launch=(deno run "${test_permissions[@]}" --allow-net src/cli/launch.ts)
# The normal-mode suite, as scripts/test.ts lists it.
read -r -a normal_suite <<<"$(deno eval "import { NORMAL_MODE_SUITE } from './scripts/test.ts'; console.log(NORMAL_MODE_SUITE.join(' '))")"

if [ $gpu -eq 1 ]; then
  export SWITCHYARD_CUDA=ON SWITCHYARD_CUDA_ARCHITECTURES=90
  bin="$root/build"
  # In the order of what a short lease must not miss: the build, a first dispatch, the kernels
  # against the host backend, the figures, then the suites, the processes, NCCL, the sanitizers.
  # Their limits add up to more than the budget: when a step hangs, the later ones get the rest.
  if step "build (CUDA, sm_90)" 120 deno task build; then
    step "the demo: 8 virtual ranks on the GPU" 30 deno run --allow-ffi --allow-env --allow-read src/cli/demo.ts
    step "kernel families through the C ABI, against the host backend" 60 "$bin/switchyard_kernel_families"
    step "benchmark (8 ranks x 4096 tokens x 7168, top-8 of 256)" 75 \
      "$bin/switchyard_gpu_bench" --json "$out/gpu_bench.json"
    step "low-latency benchmark (8 ranks x 128 and 1 tokens x 7168, top-8 of 256, FP8 dispatch, BF16 combine)" 60 \
      "$bin/switchyard_ll_bench" --json "$out/ll_bench.json"
    step "deno task bench on the GPU: prefill 8 x 4096, decode 8 x 128 and 8 x 1, sweeps; JSON, SVG plots" 90 \
      deno run "${bench_permissions[@]}" src/cli/bench.ts --backend cuda --out "$out/bench" --quiet
    step "deno bench on the GPU: dispatch and combine next to device copies, timed by CUDA events" 60 \
      deno bench --allow-ffi --allow-env --allow-read bench/cuda_bench.ts
    step "two hops on the GPU: 8 ranks as 2 virtual nodes of 4, 1024 tokens, the proxy and its NIC stream" 60 \
      deno run "${bench_permissions[@]}" src/cli/bench.ts --backend cuda --scenario deepseek-v3-prefill --ranks 8 \
      --tokens 1024 --ranks-per-node 4 --no-sweep --iterations 3 --warmup 1 --out "$out/bench-nodes" --quiet
    step "CUDA tests: every normal-mode case against the host backend, and the failures" 90 \
      env SWITCHYARD_TEST_BACKEND=cuda deno test "${test_permissions[@]}" --allow-net tests/cuda_test.ts tests/cuda_config_test.ts
    step "compute-sanitizer memcheck (one rank, compact and expanded)" 40 bash -c \
      "compute-sanitizer --tool memcheck --error-exitcode 9 $bin/switchyard_gpu_bench --sanitize &&
       compute-sanitizer --tool memcheck --error-exitcode 9 $bin/switchyard_gpu_bench --sanitize --expand"
    step "processes against virtual ranks, 2 and 8 ranks on the one GPU (4096 x 7168, top-8 of 256)" 60 \
      bash bench/process-bench.sh "$out/process_bench.txt" 2 8 -- --iterations 5
    step "the normal-mode suite on the GPU (the shared fixture)" 90 \
      env SWITCHYARD_TEST_BACKEND=cuda deno test "${test_permissions[@]}" --allow-net "${normal_suite[@]}"
    step "the low-latency suite on the GPU (the shared fixture)" 60 \
      env SWITCHYARD_TEST_BACKEND=cuda deno test "${test_permissions[@]}" --allow-net tests/low_latency_test.ts
    step "process groups on the GPU: 2 and 4 processes, killed and missing ranks" 90 \
      env SWITCHYARD_TEST_BACKEND=cuda SWITCHYARD_FAULT_JOBS=4 SWITCHYARD_FAULT_TIMEOUT_MS=2000 \
      deno test "${test_permissions[@]}" --allow-net tests/multiprocess_test.ts
    if [ -n "$nccl_lib" ]; then
      # One GPU: a single process gets a communicator; two on the one GPU are refused by NCCL
      # (duplicate GPU), which must turn NCCL off on both ranks with the reason, not fail the group.
      step "NCCL bootstrap: 1 process gets a communicator, 2 on the one GPU turn NCCL off" 40 \
        env SWITCHYARD_NCCL="$nccl_lib" bash -c \
        "${launch[*]} --nproc 1 tests/mp/nccl_bootstrap.ts --expect enabled &&
         ${launch[*]} --nproc 2 tests/mp/nccl_bootstrap.ts --expect disabled:ncclCommInitRank"
    fi
    # compute-sanitizer runs one kernel at a time, so ranks that wait for each other cannot run
    # under it: one rank, no gate (bench --sanitize), both layouts.
    for tool in racecheck synccheck; do
      step "compute-sanitizer $tool (one rank, compact and expanded)" 30 bash -c \
        "compute-sanitizer --tool $tool --error-exitcode 9 $bin/switchyard_gpu_bench --sanitize &&
         compute-sanitizer --tool $tool --error-exitcode 9 $bin/switchyard_gpu_bench --sanitize --expand"
    done
  fi
else
  bin="$root/build-cuda-cpu"
  # A GPU machine's NCCL may predate the device API: configuring against such headers must turn
  # them off with a message, never fail the build (CMakeLists.txt).
  step "CMake turns NCCL headers older than 2.29.7 off" 60 bash -c \
    "d=\$(mktemp -d) && mkdir -p \$d/nccl/include && echo '#define NCCL_VERSION_CODE 22809' >\$d/nccl/include/nccl.h &&
     cmake -S '$root' -B \$d/build -DSWITCHYARD_CUDA=OFF -DSWITCHYARD_NCCL_ROOT=\$d/nccl >\$d/log 2>&1;
     rc=\$?; cat \$d/log; grep -q 'NCCL headers off: .* has NCCL 22809' \$d/log && [ \$rc -eq 0 ]; ok=\$?; rm -rf \$d; exit \$ok"
  if step "build (the CUDA backend executed on the CPU)" 300 deno task build:cuda-cpu; then
    if [ -n "${SWITCHYARD_GPU_CHECK_SUITE_RAN:-}" ]; then
      note "" && note "=== CUDA tests and the normal-mode suite on the CPU executor: ran already ($SWITCHYARD_GPU_CHECK_SUITE_RAN)"
    else
      step "CUDA tests and the normal-mode suite on the CPU executor" 240 env SWITCHYARD_TEST_PASSES=cuda-on-cpu \
        deno run "${test_permissions[@]}" scripts/test.ts
    fi
    step "kernel families through the C ABI, against the host backend" 60 "$bin/switchyard_kernel_families"
    # What the GPU run invokes, at sizes a CPU runs in seconds: every check of the benchmark.
    step "benchmark checks: one rank, compact and expanded (the sanitizer runs)" 60 bash -c \
      "$bin/switchyard_gpu_bench --sanitize && $bin/switchyard_gpu_bench --sanitize --expand"
    step "benchmark checks: 2 ranks, compact and expanded, with the JSON" 60 bash -c \
      "$bin/switchyard_gpu_bench --small --json '$out/gpu_bench.json' && $bin/switchyard_gpu_bench --small --expand"
    step "low-latency benchmark checks at small sizes, with the JSON" 60 \
      "$bin/switchyard_ll_bench" --small --json "$out/ll_bench.json"
    step "deno task bench at small sizes on the CPU executor (what the GPU run invokes)" 90 \
      env SWITCHYARD_LIBRARY="$bin/libswitchyard.so" deno run "${bench_permissions[@]}" src/cli/bench.ts \
      --backend cuda --ranks 2 --tokens 16 --iterations 2 --warmup 1 --out "$out/bench" --quiet
    step "two hops at small sizes on the CPU executor (what the GPU run invokes)" 90 \
      env SWITCHYARD_LIBRARY="$bin/libswitchyard.so" deno run "${bench_permissions[@]}" src/cli/bench.ts \
      --backend cuda --scenario deepseek-v3-prefill --ranks 4 --tokens 16 --ranks-per-node 2 --no-sweep \
      --iterations 2 --warmup 1 --out "$out/bench-nodes" --quiet
    step "deno bench at small sizes on the CPU executor (what the GPU run invokes)" 60 \
      env SWITCHYARD_LIBRARY="$bin/libswitchyard.so" deno bench --allow-ffi --allow-env --allow-read bench/cuda_bench.ts
    step "processes against virtual ranks: what the GPU run times, at small sizes" 90 \
      env SWITCHYARD_LIBRARY="$bin/libswitchyard.so" bash bench/process-bench.sh "$out/process_bench.txt" 2 4 -- \
      --tokens 48 --hidden 256 --experts 16 --topk 4 --iterations 2
    step "NCCL bootstrap without a usable NCCL: off on every rank, with the reason" 30 \
      env SWITCHYARD_LIBRARY="$bin/libswitchyard.so" SWITCHYARD_NCCL=/nonexistent/libnccl.so.2 bash -c \
      "${launch[*]} --nproc 2 tests/mp/nccl_bootstrap.ts --expect 'disabled:no usable NCCL'"
    step "the JSON parses, with exact-size rows, host times and read+write fractions" 30 deno eval \
      "const j = JSON.parse(Deno.readTextFileSync('$out/gpu_bench.json')); if (!j.results?.length) throw new Error('no results');
       if (!j.results.some((r) => r.mode === 'exact')) throw new Error('no exact-size rows');
       for (const r of j.results) {
         if (!(r.host_us_median >= 0 && r.host_us_max >= r.host_us_median)) throw new Error('host time: ' + JSON.stringify(r));
         if (!(r.rw_bytes > 0 && 'fraction_of_copy_rw' in r)) throw new Error('read+write bytes: ' + JSON.stringify(r));
       }
       const l = JSON.parse(Deno.readTextFileSync('$out/ll_bench.json'));
       for (const r of l.results) {
         if (!(r.counts_ok && r.per_rank.length === l.ranks && r.max_p99_us >= r.max_median_us && r.bound_us > 0)) {
           throw new Error('low-latency row: ' + JSON.stringify(r).slice(0, 300));
         }
       }"
  fi
fi

note ""
note "=== summary"
for line in "${summary[@]}"; do note "$line"; done
[ -f "$out/gpu_bench.json" ] && grep -A40 '^op  ' "$log" | head -n 8
[ -f "$out/ll_bench.json" ] && grep -A5 '^op .*bound us' "$log" | head -n 6
exit $failed
