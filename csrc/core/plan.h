// The buffer plan: every byte of a rank's communication buffer, derived in one place.
//
// A rank's buffer is read and written by its peers, so all ranks must agree on its layout
// bit for bit; both backends and the size hints use this plan and nothing else.
//
//   header     doorbell | abort record | per-peer operation kinds and epochs (barrier,
//              dispatch, combine)
//              | per-peer send-count rows [R][R] i32 | per-peer expert-count rows [R][EL] i32
//              | mask [R] u32
//   low latency (when the buffer has experts for it) two identical halves, see LowLatencyPlan
//   dispatch   [R source ranks][max_tokens_per_rank slots] token records
//   combine    [R source ranks][max_tokens_per_rank slots] combine rows
// (the CUDA backend shares the header and the low-latency halves, and lays out its own exchange
// page after them: its normal mode pulls payloads straight from the peers' tensors)
//
// A token record holds the payload (BF16 or FP8 channels), the FP8 scales, the sender's top-k
// expert ids (i32) and weights (f32) and the sender's token index, each at a 16-byte boundary.
// A combine row holds the BF16 channels and the top-k weights.
#pragma once

#include <cstdint>
#include <string>

#include "hd.h"
#include "limits.h"

namespace sy::core {

// The network's lanes (BufferPlan::off_net): 0 what the receiver passes on, 1 what it keeps.
inline constexpr int kNetLanes = 2;
inline constexpr int kPassOn = 0, kKeep = 1;
// The header of a combine entry on the network: kind, source node, token, one spare word.
inline constexpr int kNetEntryHeaderBytes = 16;
enum class NetEntry : uint32_t { Start = 1, Partial = 2, Result = 3, NodePartial = 4 };

// Where entry `index` (counted on across the lane's puts) of lane `lane` from sender node `node`
// lies, from the start of the rings: one ring of `entries` slots of `entry_bytes` per (node, lane),
// entry i in slot i % entries (BufferPlan::off_net says why). The host backend places its entries
// by it (BufferPlan::net_entry); the CUDA backend finds where each ring starts by it and packs
// entries at their own sizes from there (cuda NetworkArgs::ring_packed).
SY_HD uint64_t net_ring_slot(int node, int lane, uint64_t index, int entries, int entry_bytes) {
  const uint64_t ring = uint64_t(node) * kNetLanes + uint64_t(lane);
  return (ring * uint64_t(entries) + index % uint64_t(entries)) * uint64_t(entry_bytes);
}

// The low-latency double buffer. Consecutive low-latency calls alternate between two halves, so
// one call's data survives the next call; a half holds, from its base:
//
//   signals   u32 dispatch flag per source rank (the call number that filled it), i32 counts
//             [local expert][source], u32 dispatch format, combine flag and combine format per
//             source (the formats let a receiver refuse data sent with other options), and the
//             consumption acknowledgements of the receivers
//   dispatch  [local expert][source rank][max_tokens] messages: a 16-byte header (the sender's
//             token index), the payload (BF16 width), the FP8 scale words
//   combine   [global expert][max_tokens] rows keyed by the receiver's token index: BF16
//             channels (or LogFMT-10 blocks) and 4 bytes of LogFMT metadata per 128 channels
//   send      [local expert][ranks * max_tokens][hidden] BF16: the zero-copy combine buffer
struct LowLatencyPlan {
  int32_t experts = 0;  // 0: the buffer has no low-latency region
  int32_t local_experts = 0;
  int32_t max_tokens = 0;
  int32_t hidden = 0;
  int32_t ranks = 0;

  int32_t msg_bytes = 0;
  int32_t msg_payload = 0;
  int32_t msg_scales = 0;
  int32_t row_bytes = 0;
  int32_t row_meta = 0;

  uint64_t off_dispatch_flag = 0;   // u32[R]
  uint64_t off_dispatch_count = 0;  // i32[EL][R]
  uint64_t off_dispatch_format = 0; // u32[R]: 1 = FP8, 2 = UE8M0 scales (must match the receiver's)
  uint64_t off_combine_flag = 0;    // u32[R]
  uint64_t off_combine_format = 0;  // u32[R]: 1 = LogFMT-10
  uint64_t off_consumed = 0;        // u32[R]: the last call of this half rank d has finished reading
                                    // (d writes it into every sender's half; a sender waits for it
                                    // before it writes into d's half again)
  uint64_t signal_bytes = 0;
  uint64_t off_dispatch_recv = 0;
  uint64_t off_combine_recv = 0;
  uint64_t off_send = 0;
  uint64_t half_bytes = 0;
  uint64_t off_halves = 0;          // from the buffer base

  SY_HD int64_t recv_rows() const { return int64_t(ranks) * max_tokens; }
  SY_HD uint64_t half(int h) const { return off_halves + uint64_t(h) * half_bytes; }
  SY_HD uint64_t msg(int local, int src, int64_t slot) const {
    return off_dispatch_recv +
           ((uint64_t(local) * ranks + uint64_t(src)) * uint64_t(max_tokens) + uint64_t(slot)) * uint64_t(msg_bytes);
  }
  SY_HD uint64_t combine_row(int64_t expert, int64_t token) const {
    return off_combine_recv + (uint64_t(expert) * uint64_t(max_tokens) + uint64_t(token)) * uint64_t(row_bytes);
  }
  SY_HD uint64_t send_row(int local, int64_t row) const {
    return off_send + (uint64_t(local) * uint64_t(recv_rows()) + uint64_t(row)) * uint64_t(hidden) * 2;
  }
};

struct BufferPlan {
  int32_t ranks = 0;
  int32_t hidden = 0;
  int32_t max_tokens_per_rank = 0;
  int32_t max_topk = kMaxTopk;
  int32_t max_scales = 0;  // 4-byte scale words per token: ceil(hidden / 128)
  int32_t ranks_per_node = 0;
  int32_t nodes = 1;
  // Across nodes: two hops (core/internode.h), or direct: every record and row straight to its
  // rank over the network, the baseline the two hops are measured against.
  bool direct = false;
  bool two_hop() const { return nodes > 1 && !direct; }
  // Two hops: the entries of each network ring (one ring per sender node at every rank).
  int32_t net_ring_entries = 0;

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
  uint64_t off_op_kind = 0;         // u32[2][R]: the operation peer p entered (op_slot)
  uint64_t off_op_desc = 0;         // u32[2][R][kDescSlotWords]: its parameters and epoch (op_slot)
  uint64_t off_barrier_epoch = 0;   // u32[R]: peer p has arrived at barrier n
  uint64_t off_dispatch_epoch = 0;  // u32[R]: peer p has delivered dispatch n
  uint64_t off_combine_epoch = 0;   // u32[R]: peer p has delivered combine n
  uint64_t off_send_counts = 0;     // i32[R][R]: row p = tokens p sends to every rank
  uint64_t off_expert_counts = 0;   // i32[R][kMaxExpertsPerRank]: row p = p's tokens per my expert
  uint64_t off_mask = 0;            // u32[R]: this rank's view of which peers are masked
  // Across nodes, two hops (core/internode.h): the network rings' counters, and the forwarding.
  // (The CUDA backend's signals live with its transport: there off_net_epoch says that rank p has
  // started operation n's network hop, and off_net_tail how many entries p puts here in a combine,
  // written before it; cuda/network_state.cuh, cuda/combine_network.cu.)
  uint64_t off_net_epoch = 0;       // u32[R]: operation n: the counters below from rank p are of it
  uint64_t off_net_tail = 0;        // u32[kNetLanes][R]: entries rank p has put into its ring here
  uint64_t off_net_counts = 0;      // i32[R]: dispatch: the network records rank p puts here in all
  uint64_t off_net_credit_epoch = 0;  // u32[R]: operation n: off_net_credit from rank p is of it
  uint64_t off_net_credit = 0;      // u32[kNetLanes][R]: entries rank p has taken from this rank's ring there
  uint64_t off_forward_epoch = 0;   // u32[R]: forwarder p has delivered its forwarded records of dispatch n
  uint64_t off_forwarded = 0;       // i32[R]: records of source p a forwarder delivered here (checked
                                    // against what p announced in off_send_counts)
  uint64_t off_chain_start_epoch = 0;  // u32[R]: combine n: rank p says whether its tokens start with biases
  uint64_t off_chain_starts = 0;       // u32[R]: 1 when rank p's tokens start from biases it sends
  uint64_t header_bytes = 0;

  uint64_t off_dispatch = 0;
  uint64_t dispatch_region_bytes = 0;
  uint64_t off_combine = 0;
  uint64_t combine_region_bytes = 0;
  // The network region (two hops): per sender node, the rank of that node with this rank's local
  // index, two rings (lanes) of net_ring_entries entries: lane 0 carries what the receiver passes
  // on (dispatch records; the chain's starts and partials), lane 1 what it keeps (results,
  // hierarchical partials), so that a receiver waiting to pass something on never holds up what
  // it keeps (core/internode.h). Entry i of a lane goes to position i % net_ring_entries once the
  // receiver has taken entry i - net_ring_entries (the sender's credit). (The CUDA backend packs
  // dispatch records at their own size in lane 0, so that it puts runs of them without gaps:
  // normal_kernels.h, ring_record.) An entry is large enough for each kind:
  //   network record  (dispatch) a token record, then the slot it takes at each rank of the
  //                   destination node (-1: not for that rank), then the chain words: the next and
  //                   the previous node the token visits (-1: none)
  //   combine entry   a 16-byte header (kind, the token's source node, the token), then
  //     start, partial  float channels [hidden], float top-k weights [max_topk]
  //     result          a combine row (BF16 channels, top-k weights)
  int32_t net_record_bytes = 0;
  int32_t net_slots = 0;
  int32_t net_chain_next = 0;
  int32_t net_chain_prev = 0;
  int32_t net_payload = 0;          // combine entries: where the payload starts
  int32_t net_partial_weights = 0;  // from the payload
  int32_t net_partial_bytes = 0;    // a start or partial entry, header included
  int32_t net_result_bytes = 0;     // a result entry, header included
  int32_t net_entry_bytes = 0;
  uint64_t off_net = 0;
  uint64_t net_region_bytes = 0;
  LowLatencyPlan ll;
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
  // The most one rank puts on the network in one dispatch or combine: in two hops one network
  // entry per (source node, token) of the ranks it forwards for, plus a chain's start for each of
  // its own tokens; directly one record or row per (token, rank of another node).
  uint64_t worst_network_bytes() const {
    if (nodes == 1) return 0;
    if (two_hop()) return uint64_t(nodes + 1) * uint64_t(max_tokens_per_rank) * uint64_t(net_entry_bytes);
    return uint64_t(ranks - ranks_per_node) * uint64_t(max_tokens_per_rank) *
           uint64_t(record_bytes > combine_row_bytes ? record_bytes : combine_row_bytes);
  }
  // Where entry `i` (counted from 0 in each operation) of lane `lane` from sender node `node` lies.
  uint64_t net_entry(int node, int lane, uint32_t i) const {
    return off_net + net_ring_slot(node, lane, i, net_ring_entries, net_entry_bytes);
  }
  // A lane's counter of peer p in a header array of kNetLanes x R words.
  uint64_t net_counter(uint64_t base, int lane, int p) const { return base + 4ull * (uint64_t(lane) * uint64_t(ranks) + uint64_t(p)); }
};

// The abort record a rank writes into every peer's header when it gives up on an operation, so
// that the peers fail fast instead of waiting for it. Word 0 is written last (release).
inline constexpr int kAbortWords = 8;
enum AbortWord : int { kAbortFlag = 0, kAbortRank, kAbortPeer, kAbortRole, kAbortEpoch, kAbortStatus };

// Low-latency format words: what a sender put into a half, so the receiver can refuse data
// sent with other options, or learn that the sender rejected its own input.
inline constexpr uint32_t kFormatFp8 = 1, kFormatUe8m0 = 2, kFormatLogfmt = 4, kFormatRejected = 0x100;
// The format word a sender puts into a half for its low-latency dispatch or combine.
SY_HD uint32_t ll_dispatch_format(bool fp8, bool ue8m0) { return (fp8 ? kFormatFp8 : 0u) | (ue8m0 ? kFormatUe8m0 : 0u); }
SY_HD uint32_t ll_combine_format(bool logfmt) { return logfmt ? kFormatLogfmt : 0u; }

// Parameters every rank of a collective must agree on, exchanged at the barrier (word 0 is the
// kind): dispatch {kind, payload dtype, scale words, scale dtype, top-k, experts, cached},
// combine {kind, top-k weight columns}.
inline constexpr int kDescWords = 8;
// The last word: 1 when this rank found its own input invalid; the operation then runs nowhere
// and every rank fails it (the buffers stay usable).
inline constexpr int kDescRejected = kDescWords - 1;
// A parameter slot in a header: the words, then the epoch of the operation that wrote them.
inline constexpr int kDescSlotWords = kDescWords + 1;
inline constexpr int kDescEpoch = kDescWords;

// Where peer `peer` writes its kind (`words` 1) or parameters (`words` kDescSlotWords) for
// operation `epoch` into a header's array at `base`: one slot per peer and epoch parity. A fast
// rank that has finished operation e (after a failed barrier, say) writes e+1 into the other
// slot, never over the e that a slower peer may still be comparing; e+2 needs every peer past
// e+1's barrier, unless a wait timed out, which the epoch stamp then shows.
SY_HD uint64_t op_slot(uint64_t base, int ranks, int peer, uint32_t epoch, int words) {
  return base + 4ull * uint64_t(words) * (uint64_t(epoch & 1u) * uint64_t(ranks) + uint64_t(peer));
}

// Operation kinds exchanged at the barrier, so mismatched collectives are reported as such.
enum class OpKind : uint32_t { None = 0, Dispatch = 1, Combine = 2, CleanLowLatency = 3 };

// A problem with the caller's input: which argument, and what is wrong with it.
struct Problem {
  std::string argument;
  std::string message;
  bool ok() const { return message.empty(); }
};

// Fills `plan` for a buffer of `ranks` ranks spanning nodes as `network` says, with a low-latency
// region for `ll_experts` experts when that is > 0; returns a Problem naming the offending option.
// How a buffer spans nodes: ranks per node (0: one node), the direct path or two hops, and the
// entries of each network ring (0: the default for the rank count, at most max_tokens_per_rank).
struct NetworkOptions {
  int32_t ranks_per_node = 0;
  bool direct = false;
  int32_t ring_entries = 0;
};

Problem plan_buffer(int32_t ranks, int32_t hidden, int32_t max_tokens_per_rank, int32_t ll_experts,
                    BufferPlan* plan, const NetworkOptions& network = {});

inline constexpr uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

}  // namespace sy::core
