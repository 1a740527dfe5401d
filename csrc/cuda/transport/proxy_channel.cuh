// The device side of the CPU proxy (rdma.h has the contract, proxy_ring.h the shared layout):
// a kernel thread posts descriptors into its channel's ring in host-mapped memory and waits, each
// wait with a deadline, for room in the ring, for the proxy to finish (flush) or for a signal.
// One thread per channel posts; any thread may read or wait for a signal.
#pragma once

#include <cstdint>

#include "../portable.cuh"
#include "proxy_ring.h"
#include "rdma.h"
#include "signal_wait.cuh"

namespace sy::cuda::transport {

// Passed to kernels by value (Proxy::channel on the host).
struct ProxyChannel {
  RdmaDescriptor* ring = nullptr;  // device pointers of host-mapped memory
  ProxyControl* control = nullptr;
  const uint64_t* signals = nullptr;  // this rank's [ranks][slots]
  uint32_t entries = 0;
  int32_t channel = 0, rank = 0, ranks = 0, slots = 0;
  uint64_t timeout_ns = 0;
};

namespace detail {

// The proxy's refusal, as every channel's control has it: the channel and descriptor refused.
__device__ inline TransportStatus refused(const ProxyChannel& ch, uint32_t why) {
  TransportStatus s;
  s.result = TransportResult::Refused;
  s.slot = int32_t(ld_volatile(&ch.control->refused_channel));
  s.refusal = why;
  s.refused_index = ld_volatile(&ch.control->refused_index);
  return s;
}

// Waits until the proxy has consumed `least` descriptors (a refusal ends it at once).
__device__ inline TransportStatus wait_consumed(const ProxyChannel& ch, uint64_t least, TransportWait what) {
  const uint64_t start = global_ns();
  for (uint32_t spins = 0;; ++spins) {
    const uint64_t consumed = ld_acquire_sys(&ch.control->consumed);
    if (signal_reached(consumed, least)) return {};
    if (const uint32_t why = ld_acquire_sys(&ch.control->refused); why != 0) return refused(ch, why);
    if ((spins & 63u) == 63u) {
      const uint64_t waited = global_ns() - start;
      if (waited > ch.timeout_ns) return timed_out(what, -1, ch.channel, least, consumed, waited);
      __nanosleep(256);
    }
  }
}

__device__ inline TransportStatus post(const ProxyChannel& ch, RdmaOp op, int peer, uint64_t src, uint64_t dst,
                                       uint64_t bytes, uint32_t slot, uint64_t add) {
  const uint64_t index = ld_volatile(&ch.control->posted);
  if (const uint32_t why = ld_acquire_sys(&ch.control->refused); why != 0) return refused(ch, why);
  // Descriptor index - entries must be consumed before its slot is written again.
  if (index >= ch.entries) {
    const TransportStatus room = wait_consumed(ch, index - ch.entries + 1, TransportWait::Room);
    if (!room.ok()) return room;
  }
  RdmaDescriptor* d = ch.ring + ring_slot(index, ch.entries);
  d->op = uint32_t(op);
  d->peer = peer;
  d->src_offset = src;
  d->dst_offset = dst;
  d->bytes = bytes;
  d->signal_add = add;
  d->signal = slot;
  // What the put reads (written by this block before the call, ordered by the caller's
  // __syncthreads) and the descriptor's fields come before its sequence number, for the proxy
  // and the NIC that reads the source.
  __threadfence_system();
  st_release_sys(&d->seq, index + 1);
  st_release_sys(&ch.control->posted, index + 1);
  return {};
}

}  // namespace detail

__device__ inline TransportStatus put(const ProxyChannel& ch, int peer, uint64_t src, uint64_t dst, uint64_t bytes) {
  return detail::post(ch, RdmaOp::Put, peer, src, dst, bytes, 0, 0);
}

__device__ inline TransportStatus put_signal(const ProxyChannel& ch, int peer, uint64_t src, uint64_t dst,
                                             uint64_t bytes, uint32_t slot, uint64_t add) {
  return detail::post(ch, RdmaOp::PutSignal, peer, src, dst, bytes, slot, add);
}

__device__ inline TransportStatus signal(const ProxyChannel& ch, int peer, uint32_t slot, uint64_t add) {
  return detail::post(ch, RdmaOp::Signal, peer, 0, 0, 0, slot, add);
}

__device__ inline TransportStatus flush(const ProxyChannel& ch) {
  return detail::wait_consumed(ch, ld_volatile(&ch.control->posted), TransportWait::Flush);
}

// Whether the proxy has refused a descriptor, also one posted earlier and accepted then (its NIC
// failed the put): Refused, naming the channel (`slot`) and descriptor; ok() if not.
__device__ inline TransportStatus refusal(const ProxyChannel& ch) {
  const uint32_t why = ld_acquire_sys(&ch.control->refused);
  return why == 0 ? TransportStatus{} : detail::refused(ch, why);
}

// This channel's descriptor `index` as its kernel posted it (a refused one's ring slot is not
// written again: the proxy consumes nothing after it).
__device__ inline const RdmaDescriptor& posted(const ProxyChannel& ch, uint64_t index) {
  return ch.ring[ring_slot(index, ch.entries)];
}

__device__ inline uint64_t read_signal(const ProxyChannel& ch, int source, int slot) {
  return ld_acquire_sys(&ch.signals[signal_index(source, slot, ch.slots)]);
}

// Waits for my signal (source, slot) to reach `least`. A source that never signals ends in a
// Timeout naming it; its refusals reach me through the protocol's abort records, not here.
__device__ inline TransportStatus wait_signal(const ProxyChannel& ch, int source, int slot, uint64_t least) {
  return poll_signal([&] { return read_signal(ch, source, slot); }, source, slot, least, ch.timeout_ns);
}

}  // namespace sy::cuda::transport
