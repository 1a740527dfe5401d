#include "plan.h"

namespace sy::core {

Problem plan_buffer(int32_t ranks, int32_t hidden, int32_t max_tokens_per_rank, BufferPlan* plan) {
  if (ranks < 1 || ranks > kMaxRanks) {
    return {"ranks", "ranks must be in 1.." + std::to_string(kMaxRanks) + ", got " +
                         std::to_string(ranks)};
  }
  if (hidden <= 0 || hidden > kMaxHidden || hidden % 8 != 0) {
    return {"hidden", "hidden must be a positive multiple of 8 (16-byte BF16 rows) up to " +
                          std::to_string(kMaxHidden) + ", got " + std::to_string(hidden)};
  }
  if (max_tokens_per_rank <= 0 || max_tokens_per_rank > (1 << 24)) {
    return {"maxTokensPerRank",
            "maxTokensPerRank must be in 1..16777216, got " + std::to_string(max_tokens_per_rank)};
  }
  BufferPlan p;
  p.ranks = ranks;
  p.hidden = hidden;
  p.max_tokens_per_rank = max_tokens_per_rank;
  p.max_topk = kMaxTopk;
  p.max_scales = (hidden + kScaleBlock - 1) / kScaleBlock;

  uint64_t o = 0;
  p.rec_payload = 0;
  o = align_up(uint64_t(hidden) * 2, kAlignBytes);  // BF16 is the widest payload
  p.rec_scales = int32_t(o);
  o = align_up(o + uint64_t(p.max_scales) * 4, kAlignBytes);
  p.rec_topk_idx = int32_t(o);
  o = align_up(o + uint64_t(kMaxTopk) * 4, kAlignBytes);
  p.rec_topk_weights = int32_t(o);
  o = align_up(o + uint64_t(kMaxTopk) * 4, kAlignBytes);
  p.rec_src_idx = int32_t(o);
  o = align_up(o + 4, kAlignBytes);
  p.record_bytes = int32_t(o);

  o = 0;
  p.row_payload = 0;
  o = align_up(uint64_t(hidden) * 2, kAlignBytes);
  p.row_topk_weights = int32_t(o);
  o = align_up(o + uint64_t(kMaxTopk) * 4, kAlignBytes);
  p.combine_row_bytes = int32_t(o);

  const uint64_t R = uint64_t(ranks);
  o = 0;
  p.off_doorbell = o;
  o = align_up(o + 4, kRegionAlignBytes);
  p.off_abort = o;
  o = align_up(o + 4 * kAbortWords, kRegionAlignBytes);
  p.off_op_kind = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_barrier_epoch = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_dispatch_epoch = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_combine_epoch = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_send_counts = o;
  o = align_up(o + 4 * R * R, kRegionAlignBytes);
  p.off_expert_counts = o;
  o = align_up(o + 4 * R * uint64_t(kMaxExpertsPerRank), kRegionAlignBytes);
  p.header_bytes = o;

  p.off_dispatch = o;
  p.dispatch_region_bytes = R * uint64_t(max_tokens_per_rank) * uint64_t(p.record_bytes);
  o = align_up(o + p.dispatch_region_bytes, kRegionAlignBytes);
  p.off_combine = o;
  p.combine_region_bytes = R * uint64_t(max_tokens_per_rank) * uint64_t(p.combine_row_bytes);
  o = align_up(o + p.combine_region_bytes, kRegionAlignBytes);
  p.total_bytes = o;
  if (p.total_bytes > (uint64_t(1) << 40)) {
    return {"maxTokensPerRank", "the buffer would need " + std::to_string(p.total_bytes) +
                                    " bytes per rank; lower maxTokensPerRank or hidden"};
  }
  *plan = p;
  return {};
}

}  // namespace sy::core
