#!/usr/bin/env bash
# The GPU check, one call on a machine with one NVIDIA GPU (Hopper or newer, CUDA 13, Python's
# nvidia-nccl-cu13 wheel for NCCL's headers; nothing can be fetched there):
#
#   1. builds the library and the benchmark with the CUDA backend (sm_90),
#   2. runs the CUDA tests (tests/cuda_test.ts: every normal-mode case against the host backend,
#      bit for bit, plus the failure cases), then the normal-mode suite with the fixture on the
#      GPU (SWITCHYARD_TEST_BACKEND=cuda),
#   3. runs compute-sanitizer (memcheck, racecheck, synccheck) on the benchmark's one-rank case
#      (the sanitizer runs one kernel at a time, so ranks that wait for each other cannot),
#   4. benchmarks dispatch and combine: 8 virtual ranks x 4096 tokens x hidden 7168, top-8 of 256
#      experts, BF16 and FP8, against the GPU's copy bandwidth and a naive baseline
#      (bench/gpu_bench.cu), and writes the JSON.
#
# Everything lands in $OUT (default bench/out): gpu-check.log, env.txt, gpu_bench.json. Every
# step has its own time limit and the whole script ends within 9 minutes; the exit code
# is the number of failed steps. Before the call: `bash bench/prepare-gpu-carry.sh` here, then
# run with carry [".carry"], e.g. `bash bench/gpu-check.sh` with timeout_s 600.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
out="${OUT:-$root/bench/out}"
mkdir -p "$out"
log="$out/gpu-check.log"
: >"$log"
failed=0
summary=()

note() { printf '%s\n' "$*" | tee -a "$log"; }
# step NAME SECONDS COMMAND...: runs with a time limit, logs, records the outcome.
step() {
  local name="$1" limit="$2"
  shift 2
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

# Tools: Deno from the carried tarball, NCCL's headers from the Python wheel.
deno_tgz="$(ls "$root"/.carry/deno-linux-x64-glibc-*.tgz 2>/dev/null | head -n1)"
if [ -z "$deno_tgz" ] && ! command -v deno >/dev/null; then
  note "gpu-check: no Deno: run bench/prepare-gpu-carry.sh here and carry .carry"
  exit 1
fi
if [ -n "$deno_tgz" ]; then
  mkdir -p /tmp/deno-bin
  tar -xzf "$deno_tgz" -C /tmp/deno-bin --strip-components=1 package/deno
  export PATH="/tmp/deno-bin:$PATH"
fi
# nvidia.nccl may be a namespace package (no __file__): take its first path.
nccl_root="$(python3 -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)"
[ -f "$nccl_root/include/nccl.h" ] || nccl_root=""
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  echo "nvcc: $(nvcc --version | tail -n1)"
  echo "nccl: $(python3 -c 'import importlib.metadata as m; print(m.version("nvidia-nccl-cu13"))' 2>/dev/null || echo none) ($nccl_root)"
  echo "deno: $(deno --version | head -n1)"
  echo "cuda_visible_devices: ${CUDA_VISIBLE_DEVICES:-all}"
} >"$out/env.txt" 2>&1
cat "$out/env.txt" | tee -a "$log"
# One GPU: the virtual ranks share it, and the benchmark compares events of one device.
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"

export SWITCHYARD_CUDA=ON SWITCHYARD_CUDA_ARCHITECTURES=90
[ -n "$nccl_root" ] && export SWITCHYARD_NCCL_ROOT="$nccl_root"
# Limits add up to 500 s (plus 5 s of grace each): the whole call fits a 600 s command.
if step "build (CUDA, sm_90)" 160 deno task build; then
  step "CUDA tests against the host backend" 90 deno test --allow-all tests/cuda_test.ts
  step "normal-mode suite on the GPU" 70 env SWITCHYARD_TEST_BACKEND=cuda \
    deno test --allow-all tests/dispatch_test.ts tests/combine_test.ts tests/sequence_test.ts tests/timeout_test.ts
  # compute-sanitizer runs one kernel at a time, so ranks that wait for each other cannot run
  # under it: one rank, no gate (bench --sanitize), both layouts.
  for tool in memcheck racecheck synccheck; do
    step "compute-sanitizer $tool (one rank, compact and expanded)" 35 bash -c \
      "compute-sanitizer --tool $tool --error-exitcode 9 build/switchyard_gpu_bench --sanitize &&
       compute-sanitizer --tool $tool --error-exitcode 9 build/switchyard_gpu_bench --sanitize --expand"
  done
  step "benchmark (8 ranks x 4096 tokens x 7168, top-8 of 256)" 75 \
    build/switchyard_gpu_bench --json "$out/gpu_bench.json"
fi

note ""
note "=== summary"
for line in "${summary[@]}"; do note "$line"; done
[ -f "$out/gpu_bench.json" ] && grep -A40 '^op ' "$log" | head -n 8
exit $failed
