// The one signal wait of every transport (proxy_channel.cuh, gin_channel.cuh): they differ only
// in how a signal is read.
#pragma once

#include <cstdint>

#include "../portable.cuh"
#include "proxy_ring.h"
#include "rdma.h"

namespace sy::cuda::transport {

// Polls `read()` until it reaches `least`; past `timeout_ns` a Timeout naming `source` and `slot`.
template <class Read>
__device__ TransportStatus poll_signal(Read read, int source, int slot, uint64_t least, uint64_t timeout_ns) {
  const uint64_t start = global_ns();
  for (uint32_t spins = 0;; ++spins) {
    const uint64_t v = read();
    if (signal_reached(v, least)) return {};
    if ((spins & 63u) == 63u) {
      const uint64_t waited = global_ns() - start;
      if (waited > timeout_ns) return timed_out(TransportWait::Signal, source, slot, least, v, waited);
      __nanosleep(256);
    }
  }
}

}  // namespace sy::cuda::transport
