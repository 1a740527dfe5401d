// What a rank's kernels and its CPU proxy share (transport/rdma.h has the contract): per
// channel a ring of put descriptors and a control block, in host-mapped memory, and per rank an
// array of signals, one per (source rank, slot). Compiled by both sides: plain C++ on the host,
// __host__ __device__ in CUDA.
//
//   ring        entries x RdmaDescriptor. The kernel fills descriptor `index` at slot
//               index % entries and stores its `seq` = index + 1 last (release): the proxy takes
//               the descriptor when it sees that value, so a half-written descriptor or one of
//               the previous lap is never taken.
//   control     `posted` (the kernel's count, for the host's diagnostics), `consumed` (the
//               proxy's: descriptors whose puts have completed, so their sources may be reused
//               and their ring slots refilled; release), and a refusal: the proxy's first, the
//               same in every channel's control (why, and which channel's which descriptor).
//   signals     uint64 counters, each written by one source's proxy only (fetch-add, release,
//               after the data of every earlier put of that source's channel to this rank is in
//               the window); the kernel reads them with acquire loads.
#pragma once

#include <cstdint>

#include "../../core/hd.h"

namespace sy::cuda::transport {

enum class RdmaOp : uint32_t {
  Put = 1,        // bytes from my window to the peer's window
  PutSignal = 2,  // a put, then the peer's signal (my row) grows by signal_add
  Signal = 3,     // the peer's signal grows, after my earlier puts to it have landed
};

struct alignas(64) RdmaDescriptor {
  uint64_t seq;  // index + 1, written last
  uint32_t op;   // RdmaOp
  int32_t peer;
  uint64_t src_offset, dst_offset, bytes;  // in my window, in the peer's window
  uint64_t signal_add;
  uint32_t signal;  // the slot, in the peer's row for me
  uint32_t reserved;
  uint64_t reserved2;
};
static_assert(sizeof(RdmaDescriptor) == 64, "one cache line per descriptor");

// Why the proxy refused a descriptor (then it takes nothing more until reset).
enum class Refusal : uint32_t {
  None = 0,
  Op,           // not an RdmaOp
  Peer,         // no such rank, or not one this rank reaches
  PeerWindow,   // the peer has no window (never attached, or gone)
  Source,       // the source range leaves my window
  Destination,  // the destination range leaves the peer's window
  Signal,       // no such signal slot
  Device,       // the NIC engine failed (a CUDA error for the emulated NIC, a failed work request for ibverbs)
  Size,         // more than the engine carries in one put (ibverbs: a signal of too many immediates)
  SignalChannel,  // a signal raised on another channel than the one its slot is raised on (NCCL GIN's rule)
};

inline const char* refusal_text(Refusal r) {
  switch (r) {
    case Refusal::None: return "none";
    case Refusal::Op: return "not a put, put-with-signal or signal";
    case Refusal::Peer: return "the peer is not a rank this one puts to";
    case Refusal::PeerWindow: return "the peer has no window";
    case Refusal::Source: return "the source range leaves this rank's window";
    case Refusal::Destination: return "the destination range leaves the peer's window";
    case Refusal::Signal: return "no such signal slot";
    case Refusal::Device: return "the NIC engine failed";
    case Refusal::Size: return "more than the NIC carries in one put";
    case Refusal::SignalChannel:
      return "the signal came on another channel than its slot's (NCCL GIN reads a signal in the context that "
             "raised it)";
  }
  return "unknown";
}

struct alignas(64) ProxyControl {
  uint64_t posted;
  uint64_t reserved0[7];
  uint64_t consumed;
  uint32_t refused;  // Refusal, stored with release before the kernel can see its descriptor stuck
  uint32_t refused_channel;  // kNoChannel: the NIC engine failed, on no descriptor
  uint64_t refused_index;
  uint64_t reserved2[5];
};
static_assert(sizeof(ProxyControl) == 128, "the kernel's and the proxy's words on separate lines");
constexpr uint32_t kNoChannel = 0xFFFFFFFFu;

SY_HD uint64_t ring_slot(uint64_t index, uint32_t entries) { return index % entries; }
SY_HD uint64_t signal_index(int source, int slot, int slots) { return uint64_t(source) * uint64_t(slots) + uint64_t(slot); }
// Counters wrap: "v has reached least" compares the difference, as GIN's rolling comparison.
SY_HD bool signal_reached(uint64_t v, uint64_t least) { return int64_t(v - least) >= 0; }

// Whether `[offset, offset + bytes)` lies in a window of `window` bytes, without overflow.
SY_HD bool range_in(uint64_t offset, uint64_t bytes, uint64_t window) {
  return offset <= window && bytes <= window - offset;
}

// The proxy's checks of one descriptor, in the order it makes them.
SY_HD Refusal check_descriptor(const RdmaDescriptor& d, int ranks, int slots, uint64_t my_window,
                               bool peer_attached, uint64_t peer_window) {
  if (d.op != uint32_t(RdmaOp::Put) && d.op != uint32_t(RdmaOp::PutSignal) && d.op != uint32_t(RdmaOp::Signal))
    return Refusal::Op;
  if (d.peer < 0 || d.peer >= ranks) return Refusal::Peer;
  if (!peer_attached) return Refusal::PeerWindow;
  if (d.op != uint32_t(RdmaOp::Signal)) {
    if (!range_in(d.src_offset, d.bytes, my_window)) return Refusal::Source;
    if (!range_in(d.dst_offset, d.bytes, peer_window)) return Refusal::Destination;
  }
  if (d.op != uint32_t(RdmaOp::Put) && d.signal >= uint32_t(slots)) return Refusal::Signal;
  return Refusal::None;
}

}  // namespace sy::cuda::transport
