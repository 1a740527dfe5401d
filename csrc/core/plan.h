// The buffer plan: every byte of a rank's communication buffer, derived in one place.
//
// A rank's buffer is read and written by its peers, so all ranks must agree on its layout
// bit for bit; both backends and the size hints use this plan and nothing else.
//
//   header     doorbell | abort record | per-peer operation kinds and epochs (barrier,
//              dispatch, combine)
//              | per-peer send-count rows [R][R] i32 | per-peer expert-count rows [R][EL] i32
//   dispatch   [R source ranks][max_tokens_per_rank slots] token records
//   combine    [R source ranks][max_tokens_per_rank slots] combine rows
//
// A token record holds the payload (BF16 or FP8 channels), the FP8 scales, the sender's top-k
// expert ids (i32) and weights (f32) and the sender's token index, each at a 16-byte boundary.
// A combine row holds the BF16 channels and the top-k weights.
#pragma once

#include <cstdint>
#include <string>

#include "limits.h"

namespace sy::core {

struct BufferPlan {
  int32_t ranks = 0;
  int32_t hidden = 0;
  int32_t max_tokens_per_rank = 0;
  int32_t max_topk = kMaxTopk;
  int32_t max_scales = 0;  // 4-byte scale words per token: ceil(hidden / 128)

  // Token record (dispatch region), offsets within one record.
  int32_t record_bytes = 0;
  int32_t rec_payload = 0;
  int32_t rec_scales = 0;
  int32_t rec_topk_idx = 0;
  int32_t rec_topk_weights = 0;
  int32_t rec_src_idx = 0;

  // Combine row, offsets within one row.
  int32_t combine_row_bytes = 0;
  int32_t row_payload = 0;
  int32_t row_topk_weights = 0;

  // Header, offsets from the buffer base.
  uint64_t off_doorbell = 0;        // u32 bumped by every writer, waited on with a futex
  uint64_t off_abort = 0;           // u32[kAbortWords], see AbortRecord
  uint64_t off_op_kind = 0;         // u32[R]: the operation peer p entered at its last barrier
  uint64_t off_barrier_epoch = 0;   // u32[R]: peer p has arrived at barrier n
  uint64_t off_dispatch_epoch = 0;  // u32[R]: peer p has delivered dispatch n
  uint64_t off_combine_epoch = 0;   // u32[R]: peer p has delivered combine n
  uint64_t off_send_counts = 0;     // i32[R][R]: row p = tokens p sends to every rank
  uint64_t off_expert_counts = 0;   // i32[R][kMaxExpertsPerRank]: row p = p's tokens per my expert
  uint64_t header_bytes = 0;

  uint64_t off_dispatch = 0;
  uint64_t dispatch_region_bytes = 0;
  uint64_t off_combine = 0;
  uint64_t combine_region_bytes = 0;
  uint64_t total_bytes = 0;

  int64_t max_recv_rows() const { return int64_t(ranks) * max_tokens_per_rank; }
  uint64_t record_offset(int src, int64_t slot) const {
    return off_dispatch + (uint64_t(src) * uint64_t(max_tokens_per_rank) + uint64_t(slot)) *
                              uint64_t(record_bytes);
  }
  uint64_t combine_row_offset(int src, int64_t slot) const {
    return off_combine + (uint64_t(src) * uint64_t(max_tokens_per_rank) + uint64_t(slot)) *
                             uint64_t(combine_row_bytes);
  }
};

// The abort record a rank writes into every peer's header when it gives up on an operation, so
// that the peers fail fast instead of waiting for it. Word 0 is written last (release).
inline constexpr int kAbortWords = 8;
enum AbortWord : int { kAbortFlag = 0, kAbortRank, kAbortPeer, kAbortRole, kAbortEpoch, kAbortStatus };

// Operation kinds exchanged at the barrier, so mismatched collectives are reported as such.
enum class OpKind : uint32_t { None = 0, Dispatch = 1, Combine = 2 };

// A problem with the caller's input: which argument, and what is wrong with it.
struct Problem {
  std::string argument;
  std::string message;
  bool ok() const { return message.empty(); }
};

// Fills `plan` for a buffer of `ranks` ranks; returns a Problem naming the offending option.
Problem plan_buffer(int32_t ranks, int32_t hidden, int32_t max_tokens_per_rank, BufferPlan* plan);

inline constexpr uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

}  // namespace sy::core
