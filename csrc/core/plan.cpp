#include "plan.h"

#include <algorithm>

#include "config.h"

namespace sy::core {

namespace {

Problem plan_low_latency(int32_t ranks, int32_t hidden, int32_t max_tokens, int32_t experts, LowLatencyPlan* ll) {
  if (hidden % kScaleBlock != 0) {
    return {"hidden", "hidden: the low-latency mode needs a multiple of " + std::to_string(kScaleBlock) +
                          " channels (one FP8 scale per 128), got " + std::to_string(hidden)};
  }
  if (experts < ranks || experts % ranks != 0 || experts / ranks > kMaxExpertsPerRank) {
    return {"lowLatency.numExperts", "lowLatency.numExperts: " + std::to_string(experts) +
                                         " experts must split evenly over " + std::to_string(ranks) +
                                         " ranks, at most " + std::to_string(kMaxExpertsPerRank) + " each"};
  }
  LowLatencyPlan p;
  p.experts = experts;
  p.local_experts = experts / ranks;
  p.max_tokens = max_tokens;
  p.hidden = hidden;
  p.ranks = ranks;
  const uint64_t blocks = uint64_t(hidden) / kScaleBlock;
  p.msg_payload = 16;
  p.msg_scales = int32_t(16 + align_up(uint64_t(hidden) * 2, kAlignBytes));
  p.msg_bytes = int32_t(align_up(uint64_t(p.msg_scales) + 4 * blocks, kAlignBytes));
  p.row_meta = int32_t(align_up(uint64_t(hidden) * 2, kAlignBytes));
  p.row_bytes = int32_t(align_up(uint64_t(p.row_meta) + 4 * blocks, kAlignBytes));
  const uint64_t R = uint64_t(ranks), EL = uint64_t(p.local_experts);
  uint64_t o = 0;
  p.off_dispatch_flag = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_dispatch_count = o;
  o = align_up(o + 4 * EL * R, kRegionAlignBytes);
  p.off_dispatch_format = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_combine_flag = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_combine_format = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_consumed = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.signal_bytes = o;
  p.off_dispatch_recv = o;
  o = align_up(o + EL * R * uint64_t(max_tokens) * uint64_t(p.msg_bytes), kRegionAlignBytes);
  p.off_combine_recv = o;
  o = align_up(o + uint64_t(experts) * uint64_t(max_tokens) * uint64_t(p.row_bytes), kRegionAlignBytes);
  p.off_send = o;
  o = align_up(o + EL * R * uint64_t(max_tokens) * uint64_t(hidden) * 2, kRegionAlignBytes);
  p.half_bytes = align_up(o, 4096);
  *ll = p;
  return {};
}

}  // namespace

Problem plan_buffer(int32_t ranks, int32_t hidden, int32_t max_tokens_per_rank, int32_t ll_experts,
                    BufferPlan* plan, const NetworkOptions& network) {
  int32_t ranks_per_node = network.ranks_per_node;
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
  if (ranks_per_node == 0) ranks_per_node = ranks;
  if (ranks_per_node < 1 || ranks % ranks_per_node != 0) {
    return {"ranksPerNode", "ranksPerNode: " + std::to_string(ranks_per_node) + " does not divide the " +
                                std::to_string(ranks) + " ranks into whole nodes"};
  }
  BufferPlan p;
  p.ranks = ranks;
  p.ranks_per_node = ranks_per_node;
  p.nodes = ranks / ranks_per_node;
  p.direct = network.direct;
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
  o = align_up(o + 4 * 2 * R, kRegionAlignBytes);
  p.off_op_desc = o;
  o = align_up(o + 4 * 2 * R * uint64_t(kDescSlotWords), kRegionAlignBytes);
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
  p.off_mask = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_net_epoch = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_net_counts = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_forward_epoch = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_forwarded = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_chain_start_epoch = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_chain_starts = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_net_tail = o;
  o = align_up(o + 4 * kNetLanes * R, kRegionAlignBytes);
  p.off_net_credit_epoch = o;
  o = align_up(o + 4 * R, kRegionAlignBytes);
  p.off_net_credit = o;
  o = align_up(o + 4 * kNetLanes * R, kRegionAlignBytes);
  p.header_bytes = o;

  // The low-latency halves come right after the header: a backend that shares only the header
  // and what follows it (the CUDA backend, whose normal mode stages nothing here) still has them.
  if (ll_experts != 0) {
    Problem ll = plan_low_latency(ranks, hidden, max_tokens_per_rank, ll_experts, &p.ll);
    if (!ll.ok()) return ll;
    o = align_up(o, 4096);
    p.ll.off_halves = o;
    o += 2 * p.ll.half_bytes;
  }
  p.off_dispatch = o;
  p.dispatch_region_bytes = R * uint64_t(max_tokens_per_rank) * uint64_t(p.record_bytes);
  o = align_up(o + p.dispatch_region_bytes, kRegionAlignBytes);
  p.off_combine = o;
  p.combine_region_bytes = R * uint64_t(max_tokens_per_rank) * uint64_t(p.combine_row_bytes);
  o = align_up(o + p.combine_region_bytes, kRegionAlignBytes);
  if (p.two_hop()) {
    if (network.ring_entries < 0 || network.ring_entries > (1 << 24)) {
      return {"networkRingEntries", "networkRingEntries must be in 0..16777216 (0: the default), got " +
                                        std::to_string(network.ring_entries)};
    }
    const int32_t ring = network.ring_entries > 0 ? network.ring_entries : default_config(ranks).rdma_chunk_recv;
    p.net_ring_entries = std::min(ring, max_tokens_per_rank);
    p.net_slots = p.record_bytes;
    p.net_chain_next = p.net_slots + 4 * ranks_per_node;
    p.net_chain_prev = p.net_chain_next + 4;
    p.net_record_bytes = int32_t(align_up(uint64_t(p.net_chain_prev) + 4, kAlignBytes));
    p.net_payload = kNetEntryHeaderBytes;
    p.net_partial_weights = int32_t(align_up(4 * uint64_t(hidden), kAlignBytes));
    p.net_partial_bytes =
        p.net_payload + int32_t(align_up(uint64_t(p.net_partial_weights) + 4 * uint64_t(kMaxTopk), kAlignBytes));
    p.net_result_bytes = p.net_payload + p.combine_row_bytes;
    p.net_entry_bytes = std::max({p.net_record_bytes, p.net_partial_bytes, p.net_result_bytes});
    p.off_net = o;
    p.net_region_bytes = uint64_t(p.nodes) * kNetLanes * uint64_t(p.net_ring_entries) * uint64_t(p.net_entry_bytes);
    o += p.net_region_bytes;
  }
  o = align_up(o, 4096);
  p.total_bytes = o;
  if (p.total_bytes > (uint64_t(1) << 40)) {
    return {"maxTokensPerRank", "the buffer would need " + std::to_string(p.total_bytes) +
                                    " bytes per rank; lower maxTokensPerRank or hidden"};
  }
  *plan = p;
  return {};
}

}  // namespace sy::core
