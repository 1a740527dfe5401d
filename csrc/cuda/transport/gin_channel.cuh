// The RDMA transport (rdma.h) over NCCL GIN, device-initiated: the same calls as the CPU proxy's
// channel (proxy_channel.cuh), carried by NCCL's GPU-initiated networking. A channel is a GIN
// context (ordered per peer); the window is the rank's network regions, registered as an NCCL
// window (gin_network.h makes it, the same size on every rank); a kernel addresses it with the
// buffer's offsets, `origin` being where the window starts among them.
//
// Signals belong to the context that raised them: a receiver reads signal (source, slot) in the
// context its senders raise that slot on (`slot_context`, the same for every sender: the channel
// index the protocol puts that slot's signals on, cuda_normal.cu). The proxy has one signal array
// and needs no such map.
//
// Compiled only against NCCL >= 2.29.7 headers, with the CUDA backend's kernels (net_channel.cuh).
// One GPU cannot host two NCCL ranks, so it has not run here.
//
// Where GIN's own calls differ from the contract:
//   - deadlines: GIN's waits have none. wait_signal and flush poll with one here (flush through
//     a counter every put increments once its source is read, not GIN's flush(), which can also
//     return before a later peer's puts are flushed); but put and signal may still wait inside
//     NCCL for room in its queue, without a deadline.
//   - refusals: GIN does not check ranges; put checks both against the window here and returns
//     Refused (Source, Destination) instead of posting. A failure inside NCCL or the NIC is not
//     reported to the kernel: the waits for what it carried end at their deadline.
//   - flush says the sources may be reused, not that the data landed (rdma.h).
#pragma once

#include <nccl.h>
#include <nccl_device.h>

#include <cstdint>

#include "../portable.cuh"
#include "proxy_ring.h"
#include "rdma.h"
#include "signal_wait.cuh"

namespace sy::cuda::transport {

// Signal slots a GIN channel maps to contexts (slot_context).
inline constexpr int kGinMaxSlots = 8;

struct GinChannel {
  ncclDevComm comm;  // by value: trivially copyable
  ncclWindow_t window;
  uint64_t origin = 0;        // the buffer offset of the window's byte 0
  uint64_t window_bytes = 0;
  int32_t context = 0;  // the channel
  int32_t slots = 0;
  int32_t slot_context[kGinMaxSlots] = {};  // the context slot s's signals arrive on
  ncclGinCounter_t counter = 0;  // this channel's: puts whose sources were read
  // Device memory, this channel's: puts posted. Plain increments: one thread posts on a channel.
  uint64_t* posted = nullptr;
  uint64_t timeout_ns = 0;
};

namespace detail {

__device__ inline TransportStatus gin_refused(const GinChannel& ch, Refusal why) {
  TransportStatus s;
  s.result = TransportResult::Refused;
  s.slot = ch.context;
  s.refusal = uint32_t(why);
  s.refused_index = *ch.posted;
  return s;
}

// GIN counters carry 56 bits: "v has reached least" within them.
__device__ inline bool counter_reached(uint64_t v, uint64_t least) {
  constexpr uint64_t mask = (uint64_t(1) << 56) - 1;
  return ((v - least) & mask) <= (mask >> 1);
}

template <class RemoteAction>
__device__ inline TransportStatus gin_put(const GinChannel& ch, int peer, uint64_t src, uint64_t dst, uint64_t bytes,
                                          RemoteAction action) {
  if (src < ch.origin || !range_in(src - ch.origin, bytes, ch.window_bytes)) return gin_refused(ch, Refusal::Source);
  if (dst < ch.origin || !range_in(dst - ch.origin, bytes, ch.window_bytes)) {
    return gin_refused(ch, Refusal::Destination);
  }
  if (peer < 0 || peer >= ch.comm.nRanks) return gin_refused(ch, Refusal::Peer);
  // What the put reads was written by other threads of the warp or block (ordered by the caller's
  // __syncwarp or __syncthreads); the NIC reads it from device memory.
  __threadfence();
  ncclGin gin(ch.comm, ch.context);
  gin.put(ncclTeamWorld(ch.comm), peer, ch.window, size_t(dst - ch.origin), ch.window, size_t(src - ch.origin),
          size_t(bytes), action, ncclGin_CounterInc{ch.counter});
  *ch.posted += 1;
  return {};
}

}  // namespace detail

__device__ inline TransportStatus put(const GinChannel& ch, int peer, uint64_t src, uint64_t dst, uint64_t bytes) {
  return detail::gin_put(ch, peer, src, dst, bytes, ncclGin_None{});
}

__device__ inline TransportStatus put_signal(const GinChannel& ch, int peer, uint64_t src, uint64_t dst,
                                             uint64_t bytes, uint32_t slot, uint64_t add) {
  if (slot >= uint32_t(ch.slots)) return detail::gin_refused(ch, Refusal::Signal);
  const ncclGinSignal_t id = ncclGinSignal_t(signal_index(ch.comm.rank, int(slot), ch.slots));
  return detail::gin_put(ch, peer, src, dst, bytes, ncclGin_SignalAdd{id, add});
}

__device__ inline TransportStatus signal(const GinChannel& ch, int peer, uint32_t slot, uint64_t add) {
  if (slot >= uint32_t(ch.slots)) return detail::gin_refused(ch, Refusal::Signal);
  if (peer < 0 || peer >= ch.comm.nRanks) return detail::gin_refused(ch, Refusal::Peer);
  ncclGin gin(ch.comm, ch.context);
  const ncclGinSignal_t id = ncclGinSignal_t(signal_index(ch.comm.rank, int(slot), ch.slots));
  gin.signal(ncclTeamWorld(ch.comm), peer, ncclGin_SignalAdd{id, add});
  return {};
}

__device__ inline TransportStatus flush(const GinChannel& ch) {
  ncclGin gin(ch.comm, ch.context);
  const uint64_t least = *ch.posted;
  const uint64_t start = global_ns();
  for (uint32_t spins = 0;; ++spins) {
    const uint64_t v = gin.readCounter(ch.counter);
    if (detail::counter_reached(v, least)) return {};
    if ((spins & 63u) == 63u) {
      const uint64_t waited = global_ns() - start;
      if (waited > ch.timeout_ns) return timed_out(TransportWait::Flush, -1, ch.context, least, v, waited);
      __nanosleep(256);
    }
  }
}

__device__ inline uint64_t read_signal(const GinChannel& ch, int source, int slot) {
  ncclGin gin(ch.comm, ch.slot_context[slot]);
  return gin.readSignal(ncclGinSignal_t(signal_index(source, slot, ch.slots)));
}

__device__ inline TransportStatus wait_signal(const GinChannel& ch, int source, int slot, uint64_t least) {
  return poll_signal([&] { return read_signal(ch, source, slot); }, source, slot, least, ch.timeout_ns);
}

}  // namespace sy::cuda::transport
