// The RDMA transport (rdma.h) over NCCL GIN, device-initiated: the same calls as the CPU proxy's
// channel (proxy_channel.cuh), carried by NCCL's GPU-initiated networking. A channel is a GIN
// context (one queue pair per peer, ordered); the window is the rank's buffer registered as a
// symmetric NCCL window; my signal (source, slot) is GIN signal signal_index(source, slot).
//
// Compiled only against NCCL >= 2.29.7 headers (nccl_headers.cu instantiates every call), so a
// header change that breaks it fails the build. Not yet driven by any operation: the host side
// (ncclDevCommCreate with ginSignalCount = ranks x slots, window registration) comes with the
// two-hop kernels, and one GPU cannot host two NCCL ranks to run it here.
//
// GIN's own waits have no deadline; wait_signal polls readSignal with one, as every wait here.
// GIN's flush() says the sources may be reused, not that the data has landed: rdma.h promises no
// more; landing is what signals say.
#pragma once

#include <nccl.h>
#include <nccl_device.h>

#include <cstdint>

#include "../portable.cuh"
#include "proxy_ring.h"
#include "rdma.h"

namespace sy::cuda::transport {

struct GinChannel {
  ncclDevComm comm;  // by value: trivially copyable
  ncclWindow_t window;
  int32_t context = 0;  // the channel
  int32_t slots = 0;
  uint64_t timeout_ns = 0;
};

__device__ inline TransportStatus put(const GinChannel& ch, int peer, uint64_t src, uint64_t dst, uint64_t bytes) {
  ncclGin gin(ch.comm, ch.context);
  gin.put(ncclTeamWorld(ch.comm), peer, ch.window, size_t(dst), ch.window, size_t(src), size_t(bytes));
  return {};
}

__device__ inline TransportStatus put_signal(const GinChannel& ch, int peer, uint64_t src, uint64_t dst,
                                             uint64_t bytes, uint32_t slot, uint64_t add) {
  ncclGin gin(ch.comm, ch.context);
  const ncclGinSignal_t id = ncclGinSignal_t(signal_index(ch.comm.rank, int(slot), ch.slots));
  gin.put(ncclTeamWorld(ch.comm), peer, ch.window, size_t(dst), ch.window, size_t(src), size_t(bytes),
          ncclGin_SignalAdd{id, add});
  return {};
}

__device__ inline TransportStatus signal(const GinChannel& ch, int peer, uint32_t slot, uint64_t add) {
  ncclGin gin(ch.comm, ch.context);
  const ncclGinSignal_t id = ncclGinSignal_t(signal_index(ch.comm.rank, int(slot), ch.slots));
  gin.signal(ncclTeamWorld(ch.comm), peer, ncclGin_SignalAdd{id, add});
  return {};
}

__device__ inline TransportStatus flush(const GinChannel& ch) {
  ncclGin gin(ch.comm, ch.context);
  gin.flush(ncclCoopThread());
  return {};
}

__device__ inline uint64_t read_signal(const GinChannel& ch, int source, int slot) {
  ncclGin gin(ch.comm, ch.context);
  return gin.readSignal(ncclGinSignal_t(signal_index(source, slot, ch.slots)));
}

__device__ inline TransportStatus wait_signal(const GinChannel& ch, int source, int slot, uint64_t least) {
  const uint64_t start = global_ns();
  for (uint32_t spins = 0;; ++spins) {
    const uint64_t v = read_signal(ch, source, slot);
    if (signal_reached(v, least)) return {};
    if ((spins & 63u) == 63u) {
      const uint64_t waited = global_ns() - start;
      if (waited > ch.timeout_ns) {
        TransportStatus s;
        s.result = TransportResult::Timeout;
        s.waited_for = TransportWait::Signal;
        s.peer = source;
        s.slot = slot;
        s.expected = least;
        s.observed = v;
        s.waited_ns = int64_t(waited);
        return s;
      }
      __nanosleep(256);
    }
  }
}

}  // namespace sy::cuda::transport
