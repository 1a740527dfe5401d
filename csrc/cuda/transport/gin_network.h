// NCCL GIN as a buffer's network (gin_channel.cuh has the device side): a window over the
// buffer's network regions, allocated by NCCL (cuMem memory, which GIN needs) and registered on
// the process group's communicator, and a device communicator with a GIN context per channel, a
// signal per (source rank, slot) and a counter per channel.
//
// NCCL's window registration and device communicator are collective: every rank must make them,
// in the same order. A rank begins its GinNetwork when its buffer is exported, which every rank of
// a process group does, in the same order, before the shares are exchanged. What a rank does alone
// (the window's memory) happens there; the collective calls go on a queue of the communicator's
// own (one thread, in the order begun, releases included: NCCL's calls on a communicator must not
// overlap), so that no rank's event loop (which may serve the group's store) waits inside them,
// and the network's start waits for them with the buffer's deadline, naming what did not
// complete. A setup that never completes leaves the communicator's collectives out of step: later
// GIN setups on the group are refused, saying why.
//
// Built only with NCCL's headers (SY_NCCL_GIN); without them begin() says so. One GPU cannot host
// two NCCL ranks ("Duplicate GPU detected"), so this has not run here.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "../../abi/error.h"
#include "nccl_loader.h"
#include "net_channel.cuh"

namespace sy::cuda::transport {

struct GinNetworkOptions {
  const nccl::Library* lib = nullptr;
  nccl::Comm comm = nullptr;  // the group's; its rank is the group's
  // The communicator's state (its call queue, a failed setup), one per communicator: made here
  // if empty; the caller keeps it with the communicator and serialises the calls that pass it.
  std::shared_ptr<void>* comm_state = nullptr;
  int rank = 0, ranks = 0, device = 0;
  int channels = 0, slots = 0;
  std::vector<int32_t> slot_context;  // [slots]: the channel index every sender raises slot s on
  uint64_t origin = 0;        // the buffer offset the window starts at
  uint64_t window_bytes = 0;  // the same on every rank
};

class GinNetwork {
 public:
  // Makes the window's memory, then queues the collective setup on the communicator's queue;
  // `keep` (the group, whose communicator the calls use) is held until the resources are
  // released. Refused at once where GIN cannot work: a build without NCCL's headers, an NCCL
  // without the device API or of another version than the headers (GIN kernels need the same one
  // before NCCL 2.31), a communicator without the device API or a GIN backend, or one whose
  // earlier setup did not complete.
  static Error begin(const GinNetworkOptions& o, std::shared_ptr<void> keep, std::shared_ptr<GinNetwork>* out);
  // Its resources go once the setup has ended (at once if it has).
  ~GinNetwork();

  // Waits until the setup has ended, up to `deadline`: its error, or a timeout saying that some
  // rank did not take part.
  Error wait_ready(const Deadline& deadline) const;
  // After wait_ready: where the window's byte 0 is in this rank's memory.
  uint8_t* window() const;
  // After wait_ready: the channels, `posted` being `channels` device counters (zeroed).
  Error fill_channels(NetChannel* out, int count, uint64_t* posted, uint64_t timeout_ns) const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace sy::cuda::transport
