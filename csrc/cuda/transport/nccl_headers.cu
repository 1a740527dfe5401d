// Compiles NCCL's host and device API headers with the library's own flags, and every call of
// the GIN channel (gin_channel.cuh), so a header update that breaks the GIN transport fails the
// build instead of the first GPU run. NCCL is not linked: the transports will load it at run time
// by absolute path.
#include <nccl.h>
#include <nccl_device.h>

#include "gin_channel.cuh"

// CMakeLists.txt compiles this file only for headers at least this new; the assert guards a build
// configured by hand.
static_assert(NCCL_VERSION_CODE >= SY_NCCL_MINIMUM_VERSION, "the transports need the NCCL >= 2.29.7 device API");

// The device communicator is what kernels receive by value; it must stay trivially copyable.
static_assert(std::is_trivially_copyable<ncclDevComm>::value, "ncclDevComm passes by value");

namespace sy::cuda::transport {

// Never launched: it makes nvcc instantiate and compile every GIN channel call.
__global__ void gin_channel_compile_check(GinChannel ch, uint64_t* out) {
  TransportStatus s = put(ch, 1, 0, 64, 128);
  if (s.ok()) s = put_signal(ch, 1, 0, 64, 128, 0, 1);
  if (s.ok()) s = signal(ch, 1, 1, 1);
  if (s.ok()) s = flush(ch);
  if (s.ok()) s = wait_signal(ch, 1, 0, 1);
  out[0] = read_signal(ch, 1, 1) + uint64_t(s.result);
}

}  // namespace sy::cuda::transport
