// What carries the CPU proxy's puts to the peers (proxy.h). The proxy takes descriptors from its
// kernels' rings in each channel's order, refuses bad ones, completes puts in the order it took
// them (a channel's `consumed` only grows) and counts what crossed; an engine moves the bytes:
//
//   emulated_nic.h   copies into the peers' windows with the CUDA runtime and raises their
//                    signals itself (ranks of one process, or of one machine through IPC), under
//                    an optional link model
//   verbs_engine.h   ibverbs: RDMA writes over RC queue pairs, the signals carried as write
//                    immediates that the receiving rank's engine turns into its own signals
//
// The proxy's thread is the only caller, so an engine needs no locks of its own for this.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "../../abi/error.h"
#include "../../core/link_model.h"
#include "proxy_ring.h"

namespace sy::cuda::transport {

// One descriptor the proxy took, as an engine carries it.
struct NicPut {
  int channel = 0;
  uint64_t index = 0;  // in its channel
  RdmaDescriptor d{};
  bool issued = false;  // the engine has started it
  // The emulated NIC's: where the bytes go, the peer's signal word, when the link carries it,
  // and the batch of copies it went out with.
  uint8_t* dst = nullptr;
  const uint8_t* src = nullptr;
  uint64_t* signal = nullptr;
  core::LinkTimes t;
  uint64_t batch = 0;
  // ibverbs': the work request whose completion says it is done.
  uint64_t ticket = 0;
};

using NicQueue = std::deque<NicPut>;

// Per rank, the peers' puts in flight to it, so that a rank going away waits until nothing writes
// into its memory any more. Each engine's directory of ranks keeps one under its own lock: every
// call is made with `lock`, that mutex, held.
class PutsInFlight {
 public:
  explicit PutsInFlight(int ranks) : count_(size_t(ranks), 0) {}
  void add(int rank) { ++count_[size_t(rank)]; }
  void done(int rank) {
    if (--count_[size_t(rank)] == 0) cv_.notify_all();
  }
  // Waits (at most `timeout_ms`, releasing `lock` meanwhile) until none is in flight to `rank`;
  // false if some still are.
  bool wait_none(std::unique_lock<std::mutex>& lock, int rank, int64_t timeout_ms) {
    return cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return count_[size_t(rank)] == 0; });
  }

 private:
  std::vector<int64_t> count_;
  std::condition_variable cv_;
};

// What an engine step came to: nothing to do, progress, or a failure (the proxy then refuses the
// put at hand with Refusal::Device and the text).
enum class NicStep { Idle, Moved, Failed };

class NicEngine {
 public:
  virtual ~NicEngine() = default;
  virtual int ranks() const = 0;
  virtual int slots() const = 0;
  virtual const char* name() const = 0;

  // Once, with this rank's signal array ([ranks][slots], host memory that outlives the engine's
  // use of it): from now on peers may put into this rank's window.
  virtual Error start(uint64_t* signals) = 0;
  // Checks `p.d` against this rank's window and the peer's (check_descriptor) and prepares it; an
  // accepted put is the engine's until finish() or forget().
  virtual Refusal accept(NicPut& p, int64_t now_ns) = 0;
  // Starts the puts of `q` that may start now, in order. On a failure, `*failed` is the put's
  // place in `q`.
  virtual NicStep issue(NicQueue& q, int64_t now_ns, std::string* error, size_t* failed) = 0;
  // Whether `front` (the oldest put not yet finished) is complete: its source read, its bytes in
  // the peer's window and its signal raised or on its way after them.
  virtual NicStep done(const NicPut& front, int64_t now_ns, std::string* error) = 0;
  // After done(): the put is no longer the engine's.
  virtual void finish(NicPut& p) = 0;
  // Forgets a put that will not complete (a reset, or the proxy stopping).
  virtual void forget(NicPut& p) = 0;
  // Work of the engine's own, whatever the queue holds (ibverbs: the peers' immediates into this
  // rank's signals; connecting queue pairs). Its failures belong to no put: the proxy reports
  // them on no channel (the controls say kNoChannel), naming no peer.
  virtual NicStep progress(std::string* error) { return NicStep::Idle; }
  // After a failure: returns once nothing the engine started can still read or write memory;
  // what it started is then forgotten by the caller.
  virtual void quiesce() = 0;
  // Nanoseconds until `front` may move (its time to leave or to arrive under a link model).
  virtual int64_t wake_in_ns(const NicPut& front, int64_t now_ns) const { return 2000; }
  // Before the rank's window is freed: refuses new puts into it and waits, at most `timeout_ms`,
  // until the peers' puts in flight to it are done; false if they were not (its signal array is
  // then left allocated).
  virtual bool detach(int64_t timeout_ms) = 0;
};

}  // namespace sy::cuda::transport
