// The parameters of a normal-mode operation that every rank must agree on. They travel with the
// barrier (BufferPlan::off_op_desc, kDescWords words each) so a rank that disagrees is named
// instead of corrupting its peers' outputs. Both backends build them here.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "hd.h"
#include "plan.h"

namespace sy::core {

// What each word means, for the message that reports a mismatch (word 0 is the kind).
inline constexpr const char* kDispatchDescNames[kDescWords] = {
    "operation", "payload dtypes", "scale words per token", "scale dtypes", "top-k widths",
    "expert counts", "modes (cached or not)", nullptr};
inline constexpr const char* kCombineDescNames[kDescWords] = {"operation", "top-k weight widths",
                                                               "reductions across nodes", nullptr};

// Receivers trust the senders' rows: the parameters that shape them must agree.
inline void dispatch_desc(uint32_t out[kDescWords], DType x_dtype, int num_scales, DType scale_dtype, int topk,
                          int experts, bool cached, bool rejected) {
  out[0] = uint32_t(OpKind::Dispatch);
  out[1] = uint32_t(x_dtype);
  out[2] = uint32_t(num_scales);
  out[3] = num_scales ? uint32_t(scale_dtype) : 0u;
  out[4] = uint32_t(topk);
  out[5] = uint32_t(experts);
  out[6] = cached ? 1u : 0u;
  out[kDescRejected] = rejected ? 1u : 0u;
}

inline void combine_desc(uint32_t out[kDescWords], int topk, uint32_t internode_reduction, bool rejected) {
  for (int i = 0; i < kDescWords; ++i) out[i] = 0;
  out[0] = uint32_t(OpKind::Combine);
  out[1] = uint32_t(topk);
  out[2] = internode_reduction;
  out[kDescRejected] = rejected ? 1u : 0u;
}

// What a rank whose call was refused before it started (bad arguments) publishes at the
// barrier: the operation's kind, rejected; the peers then fail naming it (PeerRejected).
inline void rejected_desc(uint32_t out[kDescWords], OpKind kind) {
  for (int i = 0; i < kDescWords; ++i) out[i] = 0;
  out[0] = uint32_t(kind);
  out[kDescRejected] = 1u;
}

// What rank `peer`'s barrier slot (its kind `their_kind`, its words `theirs` with the epoch stamp)
// says against this rank's operation `epoch` with parameters `mine` (word 0 the kind): the first
// disagreement, in the order both backends report it: the slot already holds a later operation,
// another kind, the peer rejected its own input, then each parameter word.
enum class SlotVerdict : int32_t { Agree = 0, MovedOn, OtherKind, Rejected, OtherParameter };
struct SlotCheck {
  SlotVerdict verdict = SlotVerdict::Agree;
  int32_t word = 0;  // OtherParameter: which
  uint32_t mine = 0, theirs = 0;
};

SY_HD SlotCheck check_barrier_slot(const uint32_t* mine, uint32_t their_kind, const uint32_t* theirs, uint32_t epoch,
                                   bool self) {
  SlotCheck c;
  if (theirs[kDescEpoch] != epoch) {
    c.verdict = SlotVerdict::MovedOn;
    c.mine = epoch;
    c.theirs = theirs[kDescEpoch];
  } else if (their_kind != mine[0]) {
    c.verdict = SlotVerdict::OtherKind;
    c.mine = mine[0];
    c.theirs = their_kind;
  } else if (!self && theirs[kDescRejected] != 0) {
    c.verdict = SlotVerdict::Rejected;
  } else {
    for (int i = 1; i < kDescRejected; ++i) {
      if (theirs[i] == mine[i]) continue;
      c.verdict = SlotVerdict::OtherParameter;
      c.word = i;
      c.mine = mine[i];
      c.theirs = theirs[i];
      break;
    }
  }
  return c;
}

inline const char* op_kind_name(uint32_t v) {
  switch (OpKind(v)) {
    case OpKind::Dispatch: return "dispatch";
    case OpKind::Combine: return "combine";
    case OpKind::CleanLowLatency: return "cleanLowLatencyBuffer";
    default: return "nothing";
  }
}

}  // namespace sy::core
