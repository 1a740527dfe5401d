// What the GPU benchmarks share: a gate that holds every rank's stream until the host has
// enqueued them all, timing with CUDA events from its release, and the GPU's device-to-device
// copy bandwidth measured the same way (bench/gpu_bench.cu, bench/ll_bench.cu). Each benchmark
// is one translation unit: everything here has internal linkage.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "../csrc/cuda/portable.cuh"
#include "../tests/native/abi_driver.h"

namespace {

using sy::driver::die;
#define CU(call)                                                                            \
  do {                                                                                      \
    cudaError_t e_ = (call);                                                                \
    if (e_ != cudaSuccess) die(std::string(#call) + ": " + cudaGetErrorString(e_));         \
  } while (0)

using sy::cuda::global_ns;

// Holds its stream until the host sets *flag (or 10 s pass: then *timed_out says so).
__global__ void gate_kernel(const volatile int* flag, int* timed_out) {
  const uint64_t start = global_ns();
  while (*flag == 0) {
    if (global_ns() - start > 10ull * 1000000000ull) {
      *timed_out = 1;
      return;
    }
    __nanosleep(1000);
  }
}

struct Gate {
  int* flag = nullptr;
  int* timed_out = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr;
  bool enabled = true;  // without: timings include the enqueue (compute-sanitizer runs)
  explicit Gate(bool on) : enabled(on) {
    CU(cudaHostAlloc(reinterpret_cast<void**>(&flag), 2 * sizeof(int), cudaHostAllocMapped));
    timed_out = flag + 1;
    CU(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CU(cudaEventCreate(&start));
  }
  void hold() {
    flag[0] = 0;
    flag[1] = 0;
    int* dflag = nullptr;
    CU(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dflag), flag, 0));
    if (enabled) {
      SY_LAUNCH(gate_kernel, 1, 1, 0, stream)(dflag, dflag + 1);
      CU(cudaGetLastError());
    }
    CU(cudaEventRecord(start, stream));
  }
  void release() { __atomic_store_n(&flag[0], 1, __ATOMIC_RELEASE); }
};

// Milliseconds from `start` to the last of `ends`, once all have completed.
float slowest(cudaEvent_t start, std::vector<cudaEvent_t>& ends) {
  float worst = 0;
  for (cudaEvent_t end : ends) {
    CU(cudaEventSynchronize(end));
    float ms = 0;
    CU(cudaEventElapsedTime(&ms, start, end));
    worst = std::max(worst, ms);
  }
  return worst;
}

// Runs `enqueue` behind the gate on every stream; returns the milliseconds from the release to
// the last stream's completion.
template <class Enqueue>
float timed(Gate& gate, const std::vector<cudaStream_t>& streams, std::vector<cudaEvent_t>& ends, Enqueue enqueue) {
  gate.hold();
  for (cudaStream_t s : streams) CU(cudaStreamWaitEvent(s, gate.start, 0));
  enqueue();
  for (size_t r = 0; r < streams.size(); ++r) CU(cudaEventRecord(ends[r], streams[r]));
  gate.release();
  const float worst = slowest(gate.start, ends);
  if (gate.flag[1]) die("the gate timed out: enqueueing took over 10 s (did an allocation wait for the device?)");
  return worst;
}

// Runs `per_rank(r)` on one host thread per rank, all released at once just after the gate's
// start event is recorded (the gate kernel is not used); returns the milliseconds from that event
// to the last stream's completion. For exact-size dispatch: the host wait inside each call needs
// every rank's first kernels running, so a held stream or one thread calling the ranks in turn
// would never finish.
template <class PerRank>
float timed_threads(Gate& gate, const std::vector<cudaStream_t>& streams, std::vector<cudaEvent_t>& ends,
                    PerRank per_rank) {
  const int n = int(streams.size());
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      per_rank(r);
      CU(cudaEventRecord(ends[r], streams[r]));
    });
  }
  // Thread start-up stays out of the timed region: the event is recorded once all are waiting.
  while (ready.load() < n) std::this_thread::yield();
  CU(cudaEventRecord(gate.start, gate.stream));
  go.store(true, std::memory_order_release);
  for (std::thread& t : threads) t.join();
  return slowest(gate.start, ends);
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0f : v[v.size() / 2];
}

// The device-to-device copy bandwidth of this GPU, bytes copied per second.
double copy_bandwidth(Gate& gate, cudaStream_t stream, int iters, size_t bytes) {
  void *a = nullptr, *b = nullptr;
  CU(cudaMalloc(&a, bytes));
  CU(cudaMalloc(&b, bytes));
  CU(cudaMemset(a, 1, bytes));
  std::vector<cudaStream_t> streams{stream};
  cudaEvent_t end;
  CU(cudaEventCreate(&end));
  std::vector<cudaEvent_t> ends{end};
  std::vector<float> ms;
  for (int i = 0; i < iters + 2; ++i) {
    const float t = timed(gate, streams, ends, [&] { CU(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream)); });
    if (i >= 2) ms.push_back(t);
  }
  CU(cudaEventDestroy(end));
  CU(cudaFree(a));
  CU(cudaFree(b));
  return double(bytes) / (double(median(ms)) * 1e-3);
}

}  // namespace
