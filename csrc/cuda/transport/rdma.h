// The RDMA transport the two hops across nodes run on (core/internode.h): what a kernel may ask
// of the network, whichever implementation carries it.
//
// A rank registers one window (its buffer) and owns an array of signals, one per (source rank,
// slot). A kernel thread drives a channel; a channel is an ordered, non-blocking queue of
//
//   put(peer, src, dst, bytes)          bytes from my window at `src` into the peer's window at
//                                       `dst`
//   put_signal(..., slot, add)          a put, then the peer's signal (slot, me) grows by `add`
//                                       once this put's bytes and those of every earlier put of
//                                       this channel to that peer are in the peer's window
//   signal(peer, slot, add)             the same without data
//   flush()                             returns once every earlier put of the channel has read
//                                       its source (it may be reused); whether its bytes have
//                                       landed is what signals say (the proxy's flush also waits
//                                       for that, GIN's does not)
//   read_signal(source, slot)           my signal, with acquire: what its puts carried is
//                                       visible once the value is seen
//   wait_signal(source, slot, least)    read_signal until it reaches `least`, with a deadline
//
// Every wait has a deadline and returns a TransportStatus naming whom it waited for; nothing
// traps. Signal values wrap: "reached" compares differences (proxy_ring.h, signal_reached).
// Callers rely on signals alone for "the data is there", never on flush.
//
// What an implementation must do to keep the contract: raise a signal only once the data it
// follows is visible to the receiver's kernels. A NIC proxy using ibverbs does the signal as a
// fenced atomic on the same queue pair after the writes, or as a write with immediate that the
// receiver's proxy turns into the signal only after a GPUDirect flush (a loopback read or
// cuFlushGPUDirectRDMAWrites); an immediate's 32 bits carry the slot and a small `add`, not 64.
//
// Implementations:
//   proxy_channel.cuh   the CPU proxy: kernels post descriptors into a ring in host-mapped memory;
//                       a proxy thread per rank (proxy.h) executes them through a NIC engine
//                       (nic_engine.h): the emulated NIC (emulated_nic.h, with an optional link
//                       model, between the ranks of one process or the processes of one machine)
//                       or ibverbs (verbs_engine.h, RDMA writes over RC queue pairs)
//   gin_channel.cuh     NCCL GIN (device-initiated, NCCL >= 2.29.7 device API; gin_network.h
//                       makes its window and device communicator): between processes with
//                       SWITCHYARD_NIC=gin, in builds against NCCL's headers
// The kernels drive either through one type, net_channel.cuh. A signal slot of a rank is always
// raised on one channel index (GIN reads a signal in the context that raised it); the proxy
// checks that too (ProxyOptions::signal_channels).
#pragma once

#include <cstdint>

#include "../../core/hd.h"

namespace sy::cuda::transport {

enum class TransportResult : int32_t { Ok = 0, Timeout = 1, Refused = 2 };
// What a failed wait waited for.
enum class TransportWait : int32_t { None = 0, Room = 1, Flush = 2, Signal = 3 };

struct TransportStatus {
  TransportResult result = TransportResult::Ok;
  TransportWait waited_for = TransportWait::None;
  int32_t peer = -1;  // Signal: the source; Room and Flush: -1 (this rank's own proxy)
  int32_t slot = -1;  // Signal: the slot; Room, Flush and Refused: the channel
  uint64_t expected = 0, observed = 0;
  int64_t waited_ns = 0;
  uint32_t refusal = 0;        // proxy_ring.h Refusal, when Refused
  uint64_t refused_index = 0;  // the descriptor refused
  SY_HD bool ok() const { return result == TransportResult::Ok; }
};

// A wait that ran out of time: for `what`, from `peer` (-1: this rank's proxy), on `slot`.
SY_HD TransportStatus timed_out(TransportWait what, int32_t peer, int32_t slot, uint64_t expected, uint64_t observed,
                                uint64_t waited_ns) {
  TransportStatus s;
  s.result = TransportResult::Timeout;
  s.waited_for = what;
  s.peer = peer;
  s.slot = slot;
  s.expected = expected;
  s.observed = observed;
  s.waited_ns = int64_t(waited_ns);
  return s;
}

}  // namespace sy::cuda::transport
