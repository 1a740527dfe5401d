// What the two network kernels (normal_network.cu for dispatch, combine_network.cu for combine)
// share: the block's failure state, the waits with a deadline, and how each failure is recorded
// (kernel_report.cu words each one).
#pragma once

#include <cstdint>

#include "device_sync.cuh"
#include "transport/net_channel.cuh"

namespace sy::cuda {

// Block-wide state of a network kernel: the first failure stops every role; the kernel's own
// failure (what the peers are told) is kept apart from earlier ones of the operation.
struct NetState {
  int failed;     // 0, 1 (a peer aborted), 2 (this kernel failed: the peers must hear of it)
  int peer;       // whom this kernel's failure names
  int role;       // in which hop (core::WaitRole)
  int code;       // what the peers are told it was (sy_status)
};

__device__ inline void net_begin(NetState& st, core::WaitRole role) {
  st.failed = 0;
  st.peer = -1;
  st.role = int(role);
  st.code = SY_OK;
}

// This kernel's failure (the first one wins for what the peers are told); `role` names the hop
// when the failure does not.
__device__ inline void net_failed(const SyncArgs& s, NetState& st, const FailureInfo& f, core::WaitRole role) {
  report_failure(s.report, f);
  if (atomicCAS(&st.failed, 0, 2) == 0) {
    st.peer = f.peer;
    st.role = int(f.role == core::WaitRole::None ? role : f.role);
    // A timeout, the NIC failing a put to a rank (as kernel_report.cu words it), or our fault.
    st.code = f.kind == KernelFailure::Timeout                                   ? SY_ERROR_TIMEOUT
              : f.kind == KernelFailure::Internal && nic_failed_put(f.a, f.b, f.c) ? SY_ERROR_PEER_FAILED
                                                                                    : SY_ERROR_INTERNAL;
  }
}

// Every network kernel tells every rank that it has started this operation's hop, in the header
// words at `off_started` (core::BufferPlan::off_net_epoch, which this backend uses for nothing
// else). A waiter whose deadline passes names a rank that has not started, before the peer it
// waited for directly: that peer may only be waiting for the late one itself.
__device__ inline void net_announce(const SyncArgs& s, uint64_t off_started) {
  for (int r = threadIdx.x; r < s.ranks; r += blockDim.x) {
    st_release_sys(header_word(s, r, off_started + 4ull * uint64_t(s.rank)), s.epoch);
  }
}

// A wait for `peer` in `role` that passed its deadline. Named instead, in the kernel's network
// hop `late.role`: a rank that has not started that hop, if any (late_peer).
__device__ inline void net_timed_out(const SyncArgs& s, NetState& st, const LateHop& late, int peer,
                                     core::WaitRole role, int64_t expected, int64_t observed, uint64_t waited) {
  uint32_t seen = 0;
  if (const int p = late_peer(s, late, &seen); p >= 0) {
    peer = p;
    role = late.role;
    expected = s.epoch;
    observed = seen;
  }
  FailureInfo f;
  f.kind = KernelFailure::Timeout;
  f.peer = peer;
  f.role = role;
  f.expected = expected;
  f.observed = observed;
  f.waited_ns = int64_t(waited);
  net_failed(s, st, f, role);
}

// Something another rank wrote that cannot be right (a count, slot or entry past what a buffer
// holds or what this rank expects): refused before it indexes anything.
// `what`: -5 a record's slot, -6 a count of network records, -7 the records a forwarder says it
// delivered, -8 a combine entry this rank does not expect (b: its kind, c: its source node), -9 a
// network record out of order or off its way (b, c: its previous and next node), -10 a count of
// combine entries a peer announced that differs from what this rank expects (b: the lane).
__device__ inline void peer_value_wrong(const SyncArgs& s, NetState& st, core::WaitRole role, int what, int peer,
                                        int64_t limit, int64_t value, int32_t b = 0, int32_t c = 0) {
  FailureInfo f;
  f.kind = KernelFailure::Internal;
  f.a = what;
  f.b = b;
  f.c = c;
  f.peer = peer;
  f.expected = limit;
  f.observed = value;
  net_failed(s, st, f, role);
}

// The descriptor a refusal names, in this rank's `count` channels: null for an engine's failure
// that belongs to none (kNoChannel).
__device__ inline const transport::RdmaDescriptor* refused_descriptor(const transport::TransportStatus& t,
                                                                      const transport::NetChannel* channels,
                                                                      int count) {
  return t.slot >= 0 && t.slot < count ? transport::posted(channels[t.slot], t.refused_index) : nullptr;
}

// A transport call that failed: its ring full past the deadline (naming `peer`, whom it was for),
// or refused by the proxy. A refusal names the descriptor refused, maybe an earlier one than this
// call's (a put the NIC failed after accepting it): the failure names that descriptor's peer,
// read from this rank's `count` channels, or none (-1) for an engine's failure of no descriptor.
// GIN refuses only the call itself: `peer` stays.
__device__ inline void transport_failed(const SyncArgs& s, NetState& st, core::WaitRole role, int peer,
                                        const transport::TransportStatus& t, const transport::NetChannel* channels,
                                        int count) {
  if (t.result == transport::TransportResult::Refused && !(count > 0 && transport::on_gin(channels[0]))) {
    const transport::RdmaDescriptor* d = refused_descriptor(t, channels, count);
    peer = d != nullptr ? ld_volatile(&d->peer) : -1;
    if (peer < 0 || peer >= s.ranks) peer = -1;  // a descriptor refused for its peer
  }
  FailureInfo f;
  f.kind = KernelFailure::Internal;
  f.a = -4;
  f.b = int32_t(t.result);
  f.c = int32_t(t.refusal);
  f.peer = peer;
  f.expected = int64_t(t.refused_index);
  f.observed = t.slot;
  net_failed(s, st, f, role);
}

// Whether the block should stop polling: it failed already, a peer aborted (then recorded), or
// this rank's proxy (whose `count` channels these are) refused a descriptor. A put the NIC failed
// after it was posted is seen only so (nothing of this rank waits for it to complete): recorded
// naming the put's peer, every rank hears of it now rather than at its deadline. Not a signal
// alone (a credit) refused because its rank has no window any more: that rank finished the
// operation and released its buffer, as it may, and what this rank waits for still comes (the
// proxy goes on taking in the peers' signals); its next post meets the refusal.
__device__ inline bool net_stopped(const SyncArgs& s, NetState& st, uint32_t spins, core::WaitRole role,
                                   const transport::NetChannel* channels, int count) {
  if (ld_volatile(&st.failed)) return true;
  if ((spins & 63u) != 63u) return false;
  if (check_aborted(s)) {
    atomicCAS(&st.failed, 0, 1);
    return true;
  }
  // Every control holds the proxy's refusal: the first says which channel's descriptor it was.
  if (const transport::TransportStatus t = count > 0 ? transport::refusal(channels[0]) : transport::TransportStatus{};
      !t.ok()) {
    const transport::RdmaDescriptor* d = refused_descriptor(t, channels, count);
    if (d != nullptr && t.refusal == uint32_t(transport::Refusal::PeerWindow) &&
        ld_volatile(&d->op) == uint32_t(transport::RdmaOp::Signal)) {
      return false;
    }
    transport_failed(s, st, role, -1, t, channels, count);
    return true;
  }
  return false;
}

// The end of a network kernel, every thread: a failure leaves the rings' counters out of step
// with the peers', so the buffer is given up; the kernel's own failure goes to every peer.
__device__ inline void net_end(const SyncArgs& s, NetState& st, int32_t* broken) {
  __syncthreads();
  const int why = ld_volatile(&st.failed);
  if (why == 0) return;
  if (threadIdx.x == 0) *broken = 1;
  if (why == 2) {
    abort_peers(s, ld_volatile(&st.peer), core::WaitRole(ld_volatile(&st.role)),
                uint32_t(ld_volatile(&st.code)));
  }
}

}  // namespace sy::cuda
