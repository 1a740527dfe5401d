// The start-of-operation barrier's parameter slots (core::op_slot), through the host backend's
// real protocol code on two ranks' headers in plain memory. Both backends compute the slots
// with the same function; the CUDA kernels follow the same steps (csrc/cuda/device_sync.cuh).
//
//   parity   a rank that has finished operation e (its barrier failed: a parameter mismatch)
//            goes on to e+1 at once and publishes its parameters; the peer, slower, compares e
//            only now: it must still find e's parameters, not e+1's.
//   stamp    a rank that gave up waiting twice (e+1, e+2) has overwritten e's slot: the peer
//            that compares e at last is told that rank moved on, not given a false verdict.
//
// Deterministic: the slow rank is played step by step by this program. Prints one line per
// case and exits non-zero on a failure.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../csrc/core/op_desc.h"
#include "../../csrc/core/plan.h"
#include "../../csrc/host/peers.h"

namespace {

using sy::core::DType;
using sy::core::OpKind;

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  if (!ok) failures += 1;
}

struct Headers {
  sy::BufferSet set{2};
  std::vector<std::vector<uint64_t>> memory;
  Headers() {
    if (!sy::core::plan_buffer(2, 64, 8, 0, &set.plan).ok()) std::abort();
    for (int r = 0; r < 2; ++r) {
      memory.emplace_back(set.plan.header_bytes / 8 + 1, 0);
      set.bases[size_t(r)] = reinterpret_cast<uint8_t*>(memory.back().data());
    }
    set.joined = 2;
  }
  uint32_t* word(int owner, uint64_t off) { return reinterpret_cast<uint32_t*>(set.bases[size_t(owner)] + off); }
  // Rank `from` arrives at barrier `epoch` in `to`'s header with `desc`, as Peers::barrier does.
  void arrive(int from, int to, uint32_t epoch, const uint32_t* desc) {
    const sy::core::BufferPlan& p = set.plan;
    *word(to, sy::core::op_slot(p.off_op_kind, 2, from, epoch, 1)) = desc[0];
    uint32_t* slot = word(to, sy::core::op_slot(p.off_op_desc, 2, from, epoch, sy::core::kDescSlotWords));
    for (int i = 0; i < sy::core::kDescWords; ++i) slot[i] = desc[i];
    slot[sy::core::kDescEpoch] = epoch;
    __atomic_store_n(word(to, p.off_barrier_epoch + 4ull * uint64_t(from)), epoch, __ATOMIC_RELEASE);
  }
  // What rank `owner` finds in rank `from`'s parameter slot for `epoch`.
  const uint32_t* slot(int owner, int from, uint32_t epoch) {
    return word(owner, sy::core::op_slot(set.plan.off_op_desc, 2, from, epoch, sy::core::kDescSlotWords));
  }
};

}  // namespace

int main() {
  uint32_t topk2[sy::core::kDescWords], topk0[sy::core::kDescWords];
  sy::core::dispatch_desc(topk2, DType::BF16, 0, DType::F32, 2, 8, false, false);
  sy::core::dispatch_desc(topk0, DType::BF16, 0, DType::F32, 0, 0, false, false);
  const char* const* names = sy::core::kDispatchDescNames;

  {
    Headers h;
    // Operation 1: rank 1 (played here) arrives with top-k 0, rank 0 runs it with top-k 2.
    h.arrive(1, 0, 1, topk0);
    sy::Error e1 = sy::host::Peers(h.set, 0, 200, 1).barrier(OpKind::Dispatch, topk2, names);
    check(e1.status == SY_ERROR_INVALID_ARGUMENT && e1.message.find("top-k") != std::string::npos,
          "rank 0 fails operation 1 on the mismatch: " + e1.message);
    // Rank 0 goes straight on to operation 2 (rank 1 never arrives there: it times out).
    sy::Error e2 = sy::host::Peers(h.set, 0, 50, 2).barrier(OpKind::Dispatch, topk0, names);
    check(e2.status == SY_ERROR_TIMEOUT, "rank 0 waits for rank 1 at operation 2: " + e2.message);
    // Rank 1 compares operation 1 only now: rank 0's parameters for it are still there.
    const uint32_t* theirs = h.slot(1, 0, 1);
    bool same = theirs[sy::core::kDescEpoch] == 1;
    for (int i = 0; i < sy::core::kDescWords; ++i) same = same && theirs[i] == topk2[i];
    check(same, "parity: operation 2 did not overwrite rank 0's parameters for operation 1");
  }
  {
    Headers h;
    // Rank 0 gives up on operations 1, 2 and 3 (rank 1 is late for each); then rank 1 runs
    // operation 1 for real: rank 0's slot of that parity now holds operation 3.
    for (uint32_t e = 1; e <= 3; ++e) (void)sy::host::Peers(h.set, 0, 20, e).barrier(OpKind::Dispatch, topk2, names);
    sy::Error late = sy::host::Peers(h.set, 1, 200, 1).barrier(OpKind::Dispatch, topk2, names);
    check(late.status == SY_ERROR_PEER_FAILED && late.message.find("moved on to operation 3") != std::string::npos,
          "stamp: rank 1 learns that rank 0 moved on: " + late.message);
  }
  std::printf("barrier_slots: %s\n", failures == 0 ? "every case passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
