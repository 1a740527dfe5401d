// Normal-mode layout, dispatch and combine on the host backend.
//
// Dispatch, on every rank r, in stream order:
//   notify    barrier; for each token in order and each rank d it goes to, take the next slot
//             of d's receive region [r][slot] and write the record there; write r's send-count
//             row and d's per-expert counts into d's header; signal d; wait for every peer's
//             signal; derive the prefix matrix and the received counts.
//   (host)    exact-size mode waits for those counts and allocates the outputs.
//   epilogue  copy the records from the own receive region into the outputs, in receive order
//             (by source rank, then slot = the sender's token order).
// Combine mirrors it: every received row goes back into its sender's combine region at the same
// [source][slot], and each rank reduces its tokens in the order core/reduce.h defines.
// Across nodes both take two hops (host_internode.cpp, core/internode.h).
#include "host_ops.h"

#include <cstring>
#include <string>
#include <vector>

#include "../abi/protocol_errors.h"
#include "../core/op_desc.h"
#include "../core/reduce.h"
#include "../core/internode.h"
#include "../core/routing.h"
#include "emulated_nic.h"
#include "futex.h"
#include "host_internode.h"
#include "peers.h"

namespace sy::host {

namespace {

int64_t load_index(const Tensor& t, int64_t i, int64_t j) {
  return t.dtype == core::DType::I64 ? *t.at<int64_t>(i, j) : int64_t(*t.at<int32_t>(i, j));
}

void store_index(const Tensor& t, int64_t i, int64_t j, int64_t v) {
  if (t.dtype == core::DType::I64) {
    *t.at<int64_t>(i, j) = v;
  } else {
    *t.at<int32_t>(i, j) = int32_t(v);
  }
}

float load_f32(const Tensor& t, int64_t i, int64_t j) { return *t.at<float>(i, j); }

uint32_t load_word(const Tensor& t, int64_t i, int64_t j) {
  uint32_t v;
  std::memcpy(&v, t.element(i, j), 4);
  return v;
}

void store_word(const Tensor& t, int64_t i, int64_t j, uint32_t v) {
  std::memcpy(t.element(i, j), &v, 4);
}

// Every row of top-k ids: -1 or an expert in range, no expert twice.
Error check_topk(const Tensor& topk, int64_t experts) {
  const int64_t T = topk.shape[0];
  const int K = int(topk.shape[1]);
  for (int64_t t = 0; t < T; ++t) {
    int bad = -1;
    auto at = [&](int k) { return load_index(topk, t, k); };
    core::TopkProblem p = core::check_topk_row(at, K, experts, &bad);
    if (p == core::TopkProblem::None) continue;
    return topk_problem_error(p, t, bad, at(bad), experts);
  }
  return ok();
}

// Failures that every rank detects on its own need no abort; anything else leaves peers
// waiting for us, so they are told.
bool peers_must_be_told(const Error& e) { return e.status != SY_ERROR_PEER_FAILED && !e.peers_informed; }

// Runs one rank's part of a collective stage; a failure the peers cannot see is sent to them.
template <class Body>
Error with_peers(BufferSet& set, int rank, int64_t timeout_ms, uint32_t epoch, Body body) {
  Peers peers(set, rank, timeout_ms, epoch);
  Error e = body(peers);
  if (e && peers_must_be_told(e)) peers.abort_all(e);
  return e;
}

}  // namespace

Error run_layout(LayoutWork& w) {
  SY_TRY(check_topk(*w.topk_idx, w.num_experts));
  const int R = w.num_ranks;
  const int EL = w.num_experts / R;
  const int64_t T = w.num_tokens;
  auto* per_rank = reinterpret_cast<int32_t*>(w.num_tokens_per_rank->data());
  auto* per_expert = reinterpret_cast<int32_t*>(w.num_tokens_per_expert->data());
  uint8_t* in_rank = w.is_token_in_rank->data();
  const int N = R / w.ranks_per_node;
  auto* per_node = reinterpret_cast<int32_t*>(w.num_tokens_per_node->data());
  uint8_t* in_node = w.is_token_in_node->data();
  std::memset(per_rank, 0, sizeof(int32_t) * size_t(R));
  std::memset(per_expert, 0, sizeof(int32_t) * size_t(w.num_experts));
  std::memset(in_rank, 0, size_t(T) * size_t(R));
  std::memset(per_node, 0, sizeof(int32_t) * size_t(N));
  std::memset(in_node, 0, size_t(T) * size_t(N));
  for (int64_t t = 0; t < T; ++t) {
    uint8_t* row = in_rank + t * R;
    uint8_t* node_row = in_node + t * N;
    for (int k = 0; k < w.topk; ++k) {
      int64_t e = load_index(*w.topk_idx, t, k);
      if (e < 0) continue;
      per_expert[e] += 1;
      int r = core::expert_owner(e, EL);
      if (!row[r]) {
        row[r] = 1;
        per_rank[r] += 1;
      }
      int n = core::node_of(r, w.ranks_per_node);
      if (!node_row[n]) {
        node_row[n] = 1;
        per_node[n] += 1;
      }
    }
  }
  return ok();
}

namespace {

Error notify(Peers& peers, DispatchWork& w) {
  SY_TRY(peers.wait_joined());
  // Bad routing data is found here, on the stream; the barrier tells the peers, so that the
  // operation fails on every rank and the buffers stay usable.
  Error rejected = (!w.cached && w.topk > 0) ? check_topk(*w.topk_idx, w.num_experts) : ok();
  uint32_t desc[core::kDescWords];
  core::dispatch_desc(desc, w.x_dtype, w.num_scales, w.scale_dtype, w.topk, w.num_experts, w.cached, bool(rejected));
  Error b = peers.barrier(core::OpKind::Dispatch, desc, core::kDispatchDescNames);
  if (rejected) {
    rejected.peers_informed = true;
    return rejected;
  }
  SY_TRY(b);

  const core::BufferPlan& plan = peers.plan();
  const int R = peers.num_ranks();
  const int me = peers.rank();
  const int64_t T = w.num_tokens;
  const int EL = w.num_local_experts;
  DispatchHandle& h = *w.handle;
  uint8_t* route = h.is_token_in_rank->data();
  auto* slots = reinterpret_cast<int32_t*>(h.send_slot->data());

  if (!w.cached) {
    if (w.is_token_in_rank) {
      for (int64_t t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) route[t * R + r] = *w.is_token_in_rank->element(t, r) ? 1 : 0;
    } else {
      std::memset(route, 0, size_t(T) * size_t(R));
      for (int64_t t = 0; t < T; ++t)
        for (int k = 0; k < w.topk; ++k) {
          int64_t e = load_index(*w.topk_idx, t, k);
          if (e >= 0) route[t * R + core::expert_owner(e, EL)] = 1;
        }
    }
  }

  // Token t's record: what the receiver's dispatch region holds for it.
  auto write_record = [&](uint8_t* rec, int64_t t) {
    std::memcpy(rec + plan.rec_payload, w.x->element(t), size_t(w.payload_bytes));
    for (int s = 0; s < w.num_scales; ++s) {
      uint32_t v = load_word(*w.x_scales, t, s);
      std::memcpy(rec + plan.rec_scales + 4 * s, &v, 4);
    }
    auto* rec_idx = reinterpret_cast<int32_t*>(rec + plan.rec_topk_idx);
    auto* rec_w = reinterpret_cast<float*>(rec + plan.rec_topk_weights);
    for (int k = 0; k < w.topk; ++k) {
      rec_idx[k] = int32_t(load_index(*w.topk_idx, t, k));
      rec_w[k] = load_f32(*w.topk_weights, t, k);
    }
    *reinterpret_cast<int32_t*>(rec + plan.rec_src_idx) = int32_t(t);
  };

  // Slots: each destination numbers this rank's tokens in token order.
  std::vector<int32_t> sent(size_t(R), 0);
  std::vector<int32_t> expert_sent(w.topk > 0 ? size_t(R) * size_t(EL) : 0, 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int d = 0; d < R; ++d) {
      slots[t * R + d] = route[t * R + d] ? sent[d]++ : -1;
      if (slots[t * R + d] < 0) continue;
      for (int k = 0; k < w.topk; ++k) {
        int32_t local = core::local_expert(load_index(*w.topk_idx, t, k), d, EL);
        if (local >= 0) expert_sent[size_t(d) * EL + local] += 1;
      }
    }
  }

  if (!plan.two_hop()) {
    // One hop: straight into every destination's region; a destination on another node (the
    // direct path across nodes) over the emulated NIC.
    EmulatedNic nic(peers.set().network[size_t(me)], peers.set().nic);
    std::vector<uint8_t> staged(size_t(plan.record_bytes));
    const int P = plan.ranks_per_node;
    for (int64_t t = 0; t < T; ++t)
      for (int d = 0; d < R; ++d) {
        if (slots[t * R + d] < 0) continue;
        uint8_t* dst = peers.base(d) + plan.record_offset(me, slots[t * R + d]);
        if (core::node_of(d, P) == core::node_of(me, P)) {
          write_record(dst, t);
        } else {
          write_record(staged.data(), t);
          nic.put(dst, staged.data(), staged.size());
        }
      }
    nic.arrived();
  }

  for (int d = 0; d < R; ++d) {
    int32_t* row = i32_at(peers.base(d), plan.off_send_counts) + size_t(me) * R;
    for (int q = 0; q < R; ++q) row[q] = sent[q];
    if (w.topk > 0) {
      int32_t* er = i32_at(peers.base(d), plan.off_expert_counts) + size_t(me) * core::kMaxExpertsPerRank;
      for (int l = 0; l < EL; ++l) er[l] = expert_sent[size_t(d) * EL + l];
    }
    peers.signal(d, plan.off_dispatch_epoch);
  }
  // Two hops: the records go through the forwarders (their flags say when they are in).
  if (plan.two_hop()) SY_TRY(exchange_network_records(peers, h, T, slots, write_record));
  SY_TRY(peers.wait_all(plan.off_dispatch_epoch, core::WaitRole::DispatchNotify));
  if (plan.two_hop()) SY_TRY(wait_forwarders(peers));

  // Written by the peers (other processes, perhaps): every count indexes a region below, so each
  // is bounded by what one rank can send first.
  const int32_t* counts = i32_at(peers.base(me), plan.off_send_counts);
  const int32_t* per_expert = i32_at(peers.base(me), plan.off_expert_counts);
  for (int p = 0; p < R; ++p) {
    for (int j = 0; j < R + (w.topk > 0 ? EL : 0); ++j) {
      const int32_t c = j < R ? counts[size_t(p) * R + j] : per_expert[size_t(p) * core::kMaxExpertsPerRank + (j - R)];
      if (c >= 0 && c <= plan.max_tokens_per_rank) continue;
      return fail(SY_ERROR_INTERNAL, "rank " + std::to_string(me) + ": rank " + std::to_string(p) + " announced " +
                                         std::to_string(c) + " tokens for " +
                                         (j < R ? "rank " + std::to_string(j) : "local expert " + std::to_string(j - R)) +
                                         ", outside 0.." + std::to_string(plan.max_tokens_per_rank));
    }
  }
  w.rank_prefix.assign(size_t(R) * R, 0);
  for (int j = 0; j < R; ++j) {
    int32_t acc = 0;
    for (int i = 0; i < R; ++i) {
      acc += counts[size_t(i) * R + j];
      w.rank_prefix[size_t(i) * R + j] = acc;
    }
  }
  w.recv_per_source.assign(size_t(R), 0);
  int64_t n = 0;
  for (int p = 0; p < R; ++p) {
    w.recv_per_source[p] = counts[size_t(p) * R + me];
    n += w.recv_per_source[p];
  }
  if (w.topk > 0) {
    w.expert_counts_exact.assign(size_t(EL), 0);
    for (int p = 0; p < R; ++p)
      for (int l = 0; l < EL; ++l) w.expert_counts_exact[l] += per_expert[size_t(p) * core::kMaxExpertsPerRank + l];
  }
  if (w.cached && n != h.num_recv_tokens.load()) {
    return cached_mismatch_error(me, h.num_recv_tokens.load(), n);
  }
  w.num_recv_tokens = n;
  return ok();
}

}  // namespace

Error run_reject(BufferSet& set, int rank, int64_t timeout_ms, uint32_t epoch, core::OpKind kind) {
  return with_peers(set, rank, timeout_ms, epoch, [&](Peers& p) -> Error {
    SY_TRY(p.wait_joined());
    uint32_t desc[core::kDescWords];
    core::rejected_desc(desc, kind);
    return p.barrier(kind, desc, nullptr);
  });
}

Error run_dispatch_notify(BufferSet& set, int64_t timeout_ms, DispatchWork& w) {
  Error e = with_peers(set, w.rank, timeout_ms, w.epoch, [&](Peers& p) { return notify(p, w); });
  w.publish_counts(e);
  return e;
}

namespace {

Error fill_outputs(BufferSet& set, DispatchWork& w) {
  const core::BufferPlan& plan = set.plan;
  const int R = w.num_ranks;
  const int me = w.rank;
  const int EL = w.num_local_experts;
  DispatchHandle& h = *w.handle;
  uint8_t* base = set.bases[me];
  const int64_t N = w.num_recv_tokens;
  auto* src_idx = reinterpret_cast<int32_t*>(h.recv_src_idx->data());
  auto* src_rank = reinterpret_cast<int32_t*>(h.recv_src_rank->data());

  // Capacity first: a failed epilogue leaves the handle untouched.
  if (N > h.recv_capacity || (w.layout == SY_LAYOUT_COMPACT && N > w.out_rows)) {
    return capacity_error(me, N, std::min(h.recv_capacity, w.out_rows), false);
  }
  if (!w.cached) {
    std::memcpy(h.rank_prefix_matrix->data(), w.rank_prefix.data(), sizeof(int32_t) * size_t(R) * R);
  }

  auto copy_payload = [&](const uint8_t* rec, int64_t row) {
    std::memcpy(w.recv_x->element(row), rec + plan.rec_payload, size_t(w.payload_bytes));
    for (int s = 0; s < w.num_scales; ++s) {
      uint32_t v;
      std::memcpy(&v, rec + plan.rec_scales + 4 * s, 4);
      store_word(*w.recv_x_scales, row, s, v);
    }
  };

  int64_t used_rows = 0;
  if (w.layout == SY_LAYOUT_COMPACT) {
    int64_t row = 0;
    for (int p = 0; p < R; ++p) {
      for (int32_t j = 0; j < w.recv_per_source[p]; ++j, ++row) {
        const uint8_t* rec = base + plan.record_offset(p, j);
        copy_payload(rec, row);
        const auto* rec_idx = reinterpret_cast<const int32_t*>(rec + plan.rec_topk_idx);
        const auto* rec_w = reinterpret_cast<const float*>(rec + plan.rec_topk_weights);
        for (int k = 0; k < w.topk; ++k) {
          int32_t local = core::local_expert(rec_idx[k], me, EL);
          store_index(*w.recv_topk_idx, row, k, local);
          *w.recv_topk_weights->at<float>(row, k) = local >= 0 ? rec_w[k] : 0.0f;
        }
        src_idx[row] = *reinterpret_cast<const int32_t*>(rec + plan.rec_src_idx);
        src_rank[row] = p;
      }
    }
    // Worst-case tail: no expert, no weight, no source.
    for (int64_t r = N; r < w.out_rows; ++r) {
      for (int k = 0; k < w.topk; ++k) {
        store_index(*w.recv_topk_idx, r, k, -1);
        *w.recv_topk_weights->at<float>(r, k) = 0.0f;
      }
    }
    used_rows = N;
  } else {
    if (w.zero_padding && w.cached) {
      // A cached dispatch knows the groups, not their counts: the padding is whatever the rows
      // below leave unwritten, so everything is zeroed first (as the CUDA backend does).
      std::memset(w.recv_x->data(), 0, size_t(w.out_rows) * size_t(w.payload_bytes));
      if (w.recv_x_scales) std::memset(w.recv_x_scales->data(), 0, size_t(w.out_rows) * size_t(w.num_scales) * 4);
    }
    auto* exp_row = reinterpret_cast<int32_t*>(h.expanded_row->data());
    const int K = h.num_topk;
    std::vector<int64_t> group_base(size_t(EL), 0), cursor;
    std::vector<int32_t> counts = w.cached ? std::vector<int32_t>() : w.expert_counts_exact;
    int64_t rows = 0;
    if (!w.cached) {
      rows = core::expanded_rows(counts.data(), EL, w.expert_alignment, group_base.data());
      if (rows > w.out_rows) {
        return capacity_error(me, rows, w.out_rows, true);
      }
      cursor = group_base;
    } else {
      rows = h.num_rows;
    }
    int64_t n = 0;
    for (int p = 0; p < R; ++p) {
      for (int32_t j = 0; j < w.recv_per_source[p]; ++j, ++n) {
        const uint8_t* rec = base + plan.record_offset(p, j);
        const auto* rec_idx = reinterpret_cast<const int32_t*>(rec + plan.rec_topk_idx);
        const auto* rec_w = reinterpret_cast<const float*>(rec + plan.rec_topk_weights);
        for (int k = 0; k < K; ++k) {
          int64_t row;
          if (w.cached) {
            row = exp_row[n * K + k];
          } else {
            int32_t local = core::local_expert(rec_idx[k], me, EL);
            row = local >= 0 ? cursor[local]++ : -1;
            if (row >= w.out_rows || (local >= 0 && row >= group_base[local] + counts[local])) {
              return fail(SY_ERROR_INTERNAL, "rank " + std::to_string(me) + ": more rows arrived for local expert " +
                                                 std::to_string(local) + " than the peers counted");
            }
            exp_row[n * K + k] = int32_t(row);
            if (row >= 0) *w.recv_topk_weights->at<float>(row) = rec_w[k];
          }
          if (row >= 0) copy_payload(rec, row);
        }
        src_idx[n] = *reinterpret_cast<const int32_t*>(rec + plan.rec_src_idx);
        src_rank[n] = p;
      }
    }
    if (w.zero_padding && !w.cached) {
      // Padding rows of each group, then everything past the last group.
      auto zero_row = [&](int64_t r) {
        std::memset(w.recv_x->element(r), 0, size_t(w.payload_bytes));
        for (int s = 0; s < w.num_scales; ++s) store_word(*w.recv_x_scales, r, s, 0);
      };
      for (int e = 0; e < EL; ++e)
        for (int64_t r = cursor[e]; r < group_base[e] + core::align_count(counts[e], w.expert_alignment); ++r)
          zero_row(r);
      for (int64_t r = rows; r < w.out_rows; ++r) zero_row(r);
    }
    used_rows = rows;
  }
  for (int64_t r = N; r < h.recv_capacity; ++r) {
    src_idx[r] = -1;
    src_rank[r] = -1;
    if (h.layout == SY_LAYOUT_EXPANDED)
      for (int k = 0; k < h.num_topk; ++k) reinterpret_cast<int32_t*>(h.expanded_row->data())[r * h.num_topk + k] = -1;
  }
  *reinterpret_cast<int32_t*>(w.recv_count->data()) = int32_t(used_rows);
  h.num_recv_tokens.store(N);
  return ok();
}

}  // namespace

Error run_dispatch_epilogue(BufferSet& set, DispatchWork& w) {
  DispatchHandle& h = *w.handle;
  {
    std::lock_guard<std::mutex> l(w.mu);
    if (w.counts_state != 1) {  // the notify stage failed (and said so): no routing
      if (!w.cached) h.state.store(2);
      return ok();
    }
  }
  Error e = fill_outputs(set, w);
  if (!w.cached) h.state.store(e ? 2 : 1);
  return e;
}


namespace {

Error combine_body(Peers& peers, CombineWork& w) {
  SY_TRY(peers.wait_joined());
  if (w.handle->state.load() != 1) {
    // Its dispatch ran before this combine on the same stream: its outcome is known.
    return failed_handle_error(w.handle->status ? w.handle->status->result() : Error{});
  }
  uint32_t desc[core::kDescWords];
  core::combine_desc(desc, w.topk, w.internode_reduction, false);
  SY_TRY(peers.barrier(core::OpKind::Combine, desc, core::kCombineDescNames));
  const core::BufferPlan& plan = peers.plan();
  const int R = peers.num_ranks();
  const int me = peers.rank();
  const int H = w.hidden;
  DispatchHandle& h = *w.handle;
  const auto* prefix = reinterpret_cast<const int32_t*>(h.rank_prefix_matrix->data());
  const auto* exp_row = h.expanded_row ? reinterpret_cast<const int32_t*>(h.expanded_row->data()) : nullptr;
  std::vector<float> acc(static_cast<size_t>(H));

  // Send every received row back towards its sender, at the slot it came from: in two hops to
  // the sender's forwarder on this node (core/internode.h), otherwise to the sender itself, over
  // the emulated NIC if that is on another node (the direct path).
  const int P = plan.ranks_per_node;
  const bool two_hop = plan.two_hop();
  EmulatedNic nic(peers.set().network[size_t(me)], peers.set().nic);
  std::vector<uint8_t> staged(size_t(plan.combine_row_bytes));
  for (int p = 0; p < R; ++p) {
    auto column = [&](int i) { return prefix[size_t(i) * R + me]; };
    const int64_t start = core::compact_row(column, p, 0);
    const int64_t count = core::rows_from(column, p);
    const int to = two_hop ? core::forwarder(core::node_of(me, P), p, P) : p;
    const int index = two_hop ? core::forwarded_row_index(p, me, P) : me;
    const bool network = core::node_of(to, P) != core::node_of(me, P);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t n = start + j;
      uint8_t* const row = peers.base(to) + plan.combine_row_offset(index, j);
      uint8_t* dst = network ? staged.data() : row;
      if (h.layout == SY_LAYOUT_COMPACT) {
        std::memcpy(dst + plan.row_payload, w.x->element(n), size_t(H) * 2);
      } else {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int k = 0; k < h.num_topk; ++k) {
          int32_t row = exp_row[n * h.num_topk + k];
          if (row < 0) continue;
          const auto* src = reinterpret_cast<const uint16_t*>(w.x->element(row));
          for (int c = 0; c < H; ++c) acc[c] += core::bf16_to_float(src[c]);
        }
        auto* out = reinterpret_cast<uint16_t*>(dst + plan.row_payload);
        for (int c = 0; c < H; ++c) out[c] = core::float_to_bf16(acc[c]);
      }
      auto* wdst = reinterpret_cast<float*>(dst + plan.row_topk_weights);
      for (int k = 0; k < w.topk; ++k) wdst[k] = load_f32(*w.topk_weights, n, k);
      if (network) nic.put(row, staged.data(), staged.size());
    }
    if (two_hop) continue;
    if (network) nic.arrived();
    peers.signal(p, plan.off_combine_epoch);
  }
  if (two_hop) {
    for (int q = 0; q < P; ++q) peers.signal(core::node_of(me, P) * P + q, plan.off_combine_epoch);
    return combine_across_nodes(peers, w);
  }
  SY_TRY(peers.wait_all(plan.off_combine_epoch, core::WaitRole::CombineNotify));

  // Reduce, in the order core/reduce.h fixes.
  const auto* slots = reinterpret_cast<const int32_t*>(h.send_slot->data());
  uint8_t* base = peers.base(me);
  for (int64_t t = 0; t < h.num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    if (w.bias0) {
      const auto* b = reinterpret_cast<const uint16_t*>(w.bias0->element(t));
      for (int c = 0; c < H; ++c) acc[c] += core::bf16_to_float(b[c]);
    }
    if (w.bias1) {
      const auto* b = reinterpret_cast<const uint16_t*>(w.bias1->element(t));
      for (int c = 0; c < H; ++c) acc[c] += core::bf16_to_float(b[c]);
    }
    for (int p = 0; p < R; ++p) {
      int32_t slot = slots[t * R + p];
      if (slot < 0) continue;
      const auto* row = reinterpret_cast<const uint16_t*>(base + plan.combine_row_offset(p, slot) + plan.row_payload);
      for (int c = 0; c < H; ++c) acc[c] += core::bf16_to_float(row[c]);
    }
    auto* out = reinterpret_cast<uint16_t*>(w.out->element(t));
    for (int c = 0; c < H; ++c) out[c] = core::float_to_bf16(acc[c]);
    for (int k = 0; k < w.topk; ++k) {
      float a = 0.0f;
      for (int p = 0; p < R; ++p) {
        int32_t slot = slots[t * R + p];
        if (slot < 0) continue;
        a += reinterpret_cast<const float*>(base + plan.combine_row_offset(p, slot) + plan.row_topk_weights)[k];
      }
      *w.out_topk_weights->at<float>(t, k) = a;
    }
  }
  return ok();
}

}  // namespace

Error run_combine(BufferSet& set, int64_t timeout_ms, CombineWork& w) {
  return with_peers(set, w.rank, timeout_ms, w.epoch, [&](Peers& p) { return combine_body(p, w); });
}

}  // namespace sy::host
