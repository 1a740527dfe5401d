// What a deadline-bounded wait records when it gives up: who waited, for whom, on what.
// Plain data so a CUDA kernel can fill it in mapped host memory and the host can read it.
#pragma once

#include <cstdint>

namespace sy::core {

// Values match sy_wait_role in switchyard.h.
enum class WaitRole : int32_t {
  None = 0,
  Barrier = 1,
  DispatchNotify = 2,
  CombineNotify = 3,
  HostCounter = 4,
  Event = 5,
  Stream = 6,
  BufferPeers = 7,
  LLDispatch = 8,
  LLCombine = 9,
  DispatchNetwork = 10,
  DispatchForward = 11,
  CombineNetwork = 12,
};

inline const char* wait_role_name(WaitRole r) {
  switch (r) {
    case WaitRole::Barrier: return "the start-of-operation barrier";
    case WaitRole::DispatchNotify: return "dispatch (counts and tokens)";
    case WaitRole::CombineNotify: return "combine (expert outputs)";
    case WaitRole::HostCounter: return "the received-token count of dispatch";
    case WaitRole::Event: return "an event";
    case WaitRole::Stream: return "a stream";
    case WaitRole::BufferPeers: return "the peers' matching buffers";
    case WaitRole::LLDispatch: return "low-latency dispatch (messages)";
    case WaitRole::LLCombine: return "low-latency combine (expert outputs)";
    case WaitRole::DispatchNetwork: return "two-hop dispatch, the network hop (network records)";
    case WaitRole::DispatchForward: return "two-hop dispatch, the hop inside the node (the forwarder's records)";
    case WaitRole::CombineNetwork: return "two-hop combine, the network hop (starts, partial sums and results)";
    default: return "nothing";
  }
}

struct WaitFailure {
  int32_t rank = -1;       // the rank that waited
  int32_t peer = -1;       // the rank it waited for
  WaitRole role = WaitRole::None;
  int32_t channel = -1;
  int64_t expected = 0;
  int64_t observed = 0;
  double waited_seconds = 0;
};

}  // namespace sy::core

namespace sy::core {

// Bad input a kernel found while running (it cannot return an error). Lives in memory both
// the device and the host can read. Threads only note the bad token (`lowest` holds the
// complement of the lowest one: atomicMax of ~token); one thread then re-examines that token and
// fills in the rest, so the report names the first bad token and entry, as the host backend
// does, whatever order the threads ran in. `flag` is set last.
struct InputProblem {
  int32_t flag;     // 0 = none, 1 = complete
  int32_t kind;     // TopkProblem
  int64_t token;
  int32_t entry;
  int32_t experts;  // the valid range is [0, experts)
  int64_t value;
  uint64_t lowest;  // 0 = nothing noted, else ~(the lowest bad token)
};

}  // namespace sy::core
