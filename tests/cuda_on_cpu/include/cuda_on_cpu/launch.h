// Kernel launches on the CPU executor: what SY_LAUNCH (csrc/cuda/portable.cuh) expands to.
//
//   SY_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...)
//     -> Launch("kernel", grid, block, shared_bytes, stream, [](auto&&... a) { kernel(a...); })(args...)
//
// The arguments are copied when the launch is enqueued, as CUDA copies them into the kernel's
// parameter space; every GPU thread then calls the kernel on those copies.
#pragma once

#include <cuda_runtime_api.h>
#include <driver_types.h>
#include <vector_types.h>

#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace sy::cuda_cpu {

struct LaunchConfig {
  const char* kernel;
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};

// Queues `body` (run once by every GPU thread) on the configuration's stream; returns what a
// launch's cudaGetLastError would (src/stream.cpp).
cudaError_t enqueue_kernel(const LaunchConfig& config, std::function<void()> body);

template <class Call>
class Launch {
 public:
  Launch(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, Call call)
      : config_{kernel, grid, block, shared_bytes, stream}, call_(call) {}

  template <class... A>
  void operator()(A&&... args) const {
    // The queued kernel owns the only copy (GPU threads read it; it goes with the kernel).
    Call call = call_;
    enqueue_kernel(config_, [call, params = std::tuple<std::decay_t<A>...>(std::forward<A>(args)...)]() {
      std::apply(call, params);
    });
  }

 private:
  LaunchConfig config_;
  Call call_;
};

}  // namespace sy::cuda_cpu
