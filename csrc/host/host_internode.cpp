// The two-hop normal mode of the host backend across nodes; core/internode.h has the protocol
// and the reasons for it. Every put onto another node goes through the emulated NIC, which
// counts it and, with a link model, delays the flag that follows it; the small header words
// (counts, flags) go directly, as they do on one node.
#include "host_internode.h"

#include <algorithm>
#include <string>
#include <vector>

#include "../core/dtype.h"
#include "../core/internode.h"
#include "../core/routing.h"
#include "emulated_nic.h"

namespace sy::host {

namespace {

// What a forwarder keeps of a two-hop dispatch for the combine of the same handle (a later
// dispatch reuses the network region): per source node, one row per network record it forwarded.
struct ForwardTable {
  static constexpr int kToken = 0, kNext = 1, kFirst = 2, kSlots = 3;
  int stride = 0;                           // kSlots + ranks per node
  std::vector<std::vector<int32_t>> rows;   // [source node][record * stride + field]
};

std::string rank_name(int r) { return "rank " + std::to_string(r); }

// The nodes a token visits, in ascending order, from its slots at every rank.
struct Visits {
  const int32_t* slots;  // the token's row of [T][R]
  int ranks_per_node, nodes;
  bool at(int node) const {
    for (int q = 0; q < ranks_per_node; ++q)
      if (slots[node * ranks_per_node + q] >= 0) return true;
    return false;
  }
  // The first node after `node` the token visits (-1: none); after -1, its first node.
  int next(int node) const {
    for (int k = node + 1; k < nodes; ++k)
      if (at(k)) return k;
    return -1;
  }
  int last() const {
    for (int k = nodes - 1; k >= 0; --k)
      if (at(k)) return k;
    return -1;
  }
};

// [R] bytes: 1 for the ranks a wait is for.
Peers::WaitPolicy only(const std::vector<uint8_t>& ranks) {
  Peers::WaitPolicy p;
  p.only = ranks.data();
  return p;
}

}  // namespace

void send_network_records(Peers& peers, int64_t num_tokens, const int32_t* slots, const RecordWriter& write_record) {
  const core::BufferPlan& plan = peers.plan();
  const int R = peers.num_ranks(), me = peers.rank(), P = plan.ranks_per_node;
  const int my_node = core::node_of(me, P);
  EmulatedNic nic(peers.set().network[size_t(me)], peers.set().nic);
  std::vector<uint8_t> staged(size_t(plan.net_record_bytes));
  auto* staged_slots = reinterpret_cast<int32_t*>(staged.data() + plan.net_slots);
  std::vector<int32_t> records(size_t(plan.nodes), 0);
  std::vector<int32_t> direct(size_t(P), 0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const Visits visits{slots + t * R, P, plan.nodes};
    bool written = false;
    for (int n = visits.next(-1), first = 1; n >= 0; n = visits.next(n), first = 0) {
      for (int q = 0; q < P; ++q) staged_slots[q] = slots[t * R + n * P + q];
      if (!written) write_record(staged.data(), t);
      written = true;
      if (n == my_node) {
        for (int q = 0; q < P; ++q) {
          if (staged_slots[q] < 0) continue;
          std::memcpy(peers.base(n * P + q) + plan.record_offset(me, staged_slots[q]), staged.data(),
                      size_t(plan.record_bytes));
          ++direct[q];
        }
        continue;
      }
      *reinterpret_cast<int32_t*>(staged.data() + plan.net_chain_next) = visits.next(n);
      *reinterpret_cast<int32_t*>(staged.data() + plan.net_chain_first) = first;
      const int f = core::forwarder(n, me, P);
      nic.put(peers.base(f) + plan.net_offset(my_node, records[n]++), staged.data(), staged.size());
    }
  }
  for (int q = 0; q < P; ++q) i32_at(peers.base(my_node * P + q), plan.off_forwarded)[me] = direct[q];
  nic.arrived();
  for (int n = 0; n < plan.nodes; ++n) {
    const int f = core::forwarder(n, me, P);
    i32_at(peers.base(f), plan.off_net_counts)[me] = records[n];
    peers.signal(f, plan.off_net_epoch);
  }
}

Error forward_network_records(Peers& peers, DispatchHandle& handle) {
  const core::BufferPlan& plan = peers.plan();
  const int R = peers.num_ranks(), me = peers.rank(), P = plan.ranks_per_node;
  const int my_node = core::node_of(me, P);
  std::vector<uint8_t> sources(size_t(R), 0);
  // The sources this rank forwards for: the rank of each node with its own local index.
  for (int n = 0; n < plan.nodes; ++n) sources[size_t(core::forwarder(n, me, P))] = 1;
  SY_TRY(peers.wait_sources(plan.off_net_epoch, core::WaitRole::DispatchNetwork, only(sources)));
  auto table = std::make_shared<ForwardTable>();
  table->stride = ForwardTable::kSlots + P;
  table->rows.resize(size_t(plan.nodes));
  const int32_t* counts = i32_at(peers.base(me), plan.off_net_counts);
  std::vector<int32_t> delivered(static_cast<size_t>(P), 0);
  for (int n = 0; n < plan.nodes; ++n) {
    const int src = core::forwarder(n, me, P);
    if (n == my_node) continue;  // this rank itself: its own node's records went straight (hop 1)
    std::fill(delivered.begin(), delivered.end(), 0);
    const int32_t records = counts[src];
    if (records < 0 || records > plan.max_tokens_per_rank) {
      return fail(SY_ERROR_INTERNAL, rank_name(me) + ": " + rank_name(src) + " put " + std::to_string(records) +
                                         " network records, more than a buffer holds");
    }
    std::vector<int32_t>& rows = table->rows[size_t(n)];
    rows.assign(size_t(records) * size_t(table->stride), 0);
    for (int32_t j = 0; j < records; ++j) {
      const uint8_t* rec = peers.base(me) + plan.net_offset(n, j);
      const auto* rec_slots = reinterpret_cast<const int32_t*>(rec + plan.net_slots);
      int32_t* row = rows.data() + size_t(j) * size_t(table->stride);
      // Written by another process: what indexes a region is bounded before it is used.
      const int32_t token = *reinterpret_cast<const int32_t*>(rec + plan.rec_src_idx);
      const int32_t next = *reinterpret_cast<const int32_t*>(rec + plan.net_chain_next);
      const int32_t first = *reinterpret_cast<const int32_t*>(rec + plan.net_chain_first);
      const std::string record = "network record " + std::to_string(j) + " of " + rank_name(src);
      if (token < 0 || token >= plan.max_tokens_per_rank || (next != -1 && (next <= my_node || next >= plan.nodes)) ||
          (first != 0 && first != 1)) {
        return fail(SY_ERROR_INTERNAL, rank_name(me) + ": " + record + " names token " + std::to_string(token) +
                                           ", next node " + std::to_string(next) + ", first " + std::to_string(first) +
                                           ": out of range");
      }
      row[ForwardTable::kToken] = token;
      row[ForwardTable::kNext] = next;
      row[ForwardTable::kFirst] = first;
      for (int q = 0; q < P; ++q) {
        const int32_t slot = rec_slots[q];
        row[ForwardTable::kSlots + q] = slot < 0 ? -1 : slot;
        if (slot < 0) continue;
        if (slot >= plan.max_tokens_per_rank) {
          return fail(SY_ERROR_INTERNAL, rank_name(me) + ": " + record + " names slot " + std::to_string(slot) +
                                             ", beyond the " + std::to_string(plan.max_tokens_per_rank) +
                                             " a buffer holds");
        }
        std::memcpy(peers.base(my_node * P + q) + plan.record_offset(src, slot), rec, size_t(plan.record_bytes));
        ++delivered[q];
      }
    }
    for (int q = 0; q < P; ++q) i32_at(peers.base(my_node * P + q), plan.off_forwarded)[src] = delivered[q];
  }
  for (int q = 0; q < P; ++q) peers.signal(my_node * P + q, plan.off_forward_epoch);
  handle.backend_state = std::move(table);
  return ok();
}

Error wait_forwarders(Peers& peers) {
  const core::BufferPlan& plan = peers.plan();
  const int R = peers.num_ranks(), me = peers.rank(), P = plan.ranks_per_node, my_node = core::node_of(me, P);
  std::vector<uint8_t> node(size_t(R), 0);
  for (int q = 0; q < P; ++q) node[size_t(my_node * P + q)] = 1;
  SY_TRY(peers.wait_sources(plan.off_forward_epoch, core::WaitRole::DispatchForward, only(node)));
  const int32_t* announced = i32_at(peers.base(me), plan.off_send_counts);
  const int32_t* forwarded = i32_at(peers.base(me), plan.off_forwarded);
  for (int s = 0; s < R; ++s) {
    if (forwarded[s] == announced[size_t(s) * R + me]) continue;
    return fail(SY_ERROR_INTERNAL, rank_name(me) + ": " + rank_name(core::forwarder(my_node, s, P)) + " forwarded " +
                                       std::to_string(forwarded[s]) + " records of " + rank_name(s) +
                                       ", which announced " + std::to_string(announced[size_t(s) * R + me]));
  }
  return ok();
}

namespace {

// One token's float accumulator on its way along the chain: channels, then top-k weights, laid
// out as a network partial (plan.net_partial_weights) so it is put as it is.
class Partial {
 public:
  Partial(const core::BufferPlan& plan, int hidden, int topk)
      : plan_(plan), hidden_(hidden), topk_(topk), bytes_(size_t(plan.net_partial_bytes) / 4, 0.0f) {}

  void zero() { std::fill(bytes_.begin(), bytes_.end(), 0.0f); }
  // The contract's start: 0 + bias0 + bias1, top-k weights from 0.
  void start(const Tensor* bias0, const Tensor* bias1, int64_t t) {
    zero();
    for (const Tensor* b : {bias0, bias1}) {
      if (!b) continue;
      const auto* v = reinterpret_cast<const uint16_t*>(b->element(t));
      for (int c = 0; c < hidden_; ++c) bytes_[size_t(c)] += core::bf16_to_float(v[c]);
    }
  }
  void load(const uint8_t* entry) { std::memcpy(bytes_.data(), entry, size_t(plan_.net_partial_bytes)); }
  // A combine row folded in: its BF16 channels and its top-k weights.
  void add_row(const uint8_t* row) {
    const auto* v = reinterpret_cast<const uint16_t*>(row + plan_.row_payload);
    for (int c = 0; c < hidden_; ++c) bytes_[size_t(c)] += core::bf16_to_float(v[c]);
    const auto* wv = reinterpret_cast<const float*>(row + plan_.row_topk_weights);
    float* acc_w = weights();
    for (int k = 0; k < topk_; ++k) acc_w[k] += wv[k];
  }
  // Rounded once: the token's result, as a combine row.
  void result(uint8_t* row) const {
    auto* out = reinterpret_cast<uint16_t*>(row + plan_.row_payload);
    for (int c = 0; c < hidden_; ++c) out[c] = core::float_to_bf16(bytes_[size_t(c)]);
    std::memcpy(row + plan_.row_topk_weights, weights(), 4 * size_t(topk_));
  }
  const void* data() const { return bytes_.data(); }

 private:
  float* weights() { return bytes_.data() + plan_.net_partial_weights / 4; }
  const float* weights() const { return bytes_.data() + plan_.net_partial_weights / 4; }
  const core::BufferPlan& plan_;
  int hidden_, topk_;
  std::vector<float> bytes_;
};

// The source's results: BF16 channels into `out`, top-k weights into `out_weights`.
void store_result(const core::BufferPlan& plan, const uint8_t* row, CombineWork& w, int64_t t) {
  std::memcpy(w.out->element(t), row + plan.row_payload, size_t(w.hidden) * 2);
  const auto* wv = reinterpret_cast<const float*>(row + plan.row_topk_weights);
  for (int k = 0; k < w.topk; ++k) *w.out_topk_weights->at<float>(t, k) = wv[k];
}

// What both reductions across nodes work with: this rank's place, the tokens it forwards (the
// handle's forwarding table) and its own tokens' routing (the handle's slots).
struct CombineAcrossNodes {
  Peers& peers;
  CombineWork& w;
  const core::BufferPlan& plan = peers.plan();
  const int R = peers.num_ranks(), me = peers.rank(), P = plan.ranks_per_node, N = plan.nodes;
  const int my_node = core::node_of(me, P);
  const ForwardTable* table = nullptr;
  const int32_t* slots = reinterpret_cast<const int32_t*>(w.handle->send_slot->data());
  const int64_t T = w.handle->num_tokens;

  int column(int node) const { return core::forwarder(node, me, P); }  // this rank's peer on `node`
  Visits visits(int64_t t) const { return Visits{slots + t * R, P, N}; }
  // [R] bytes for a wait: the ranks of this node; the columns of the nodes `pick` chooses.
  std::vector<uint8_t> node_ranks() const {
    std::vector<uint8_t> v(size_t(R), 0);
    for (int q = 0; q < P; ++q) v[size_t(my_node * P + q)] = 1;
    return v;
  }
  template <class Pick>
  std::vector<uint8_t> columns(Pick pick) const {
    std::vector<uint8_t> v(size_t(R), 0);
    for (int k = 0; k < N; ++k)
      if (k != my_node && pick(k)) v[size_t(column(k))] = 1;
    return v;
  }
  // Adds this node's rows of a token of source node m to `acc`, ranks ascending.
  template <class SlotOf>
  void add_rows(Partial& acc, int m, SlotOf slot_of) const {
    for (int q = 0; q < P; ++q) {
      const int32_t slot = slot_of(q);
      if (slot >= 0) acc.add_row(peers.base(me) + plan.combine_row_offset(m * P + q, slot));
    }
  }
  // Calls f(m, token, slot_of, first, next) for every token this rank forwards: its own node's
  // tokens (m == my_node; `first` and `next` from its routing), then each other node's (from the
  // table), in node order.
  template <class F>
  void for_each_forwarded(F f) const {
    for (int m = 0; m < N; ++m) {
      if (m == my_node) {
        for (int64_t t = 0; t < T; ++t) {
          const Visits v = visits(t);
          if (!v.at(my_node)) continue;
          f(m, t, [&](int q) { return slots[t * R + my_node * P + q]; }, v.next(-1) == my_node, v.next(my_node));
        }
        continue;
      }
      const std::vector<int32_t>& rows = table->rows[size_t(m)];
      for (size_t j = 0; j < rows.size(); j += size_t(table->stride)) {
        const int32_t* e = rows.data() + j;
        f(m, int64_t(e[ForwardTable::kToken]), [e](int q) { return e[ForwardTable::kSlots + q]; },
          e[ForwardTable::kFirst] != 0, e[ForwardTable::kNext]);
      }
    }
  }

  Error chain();
  Error hierarchical();
};

}  // namespace

Error combine_across_nodes(Peers& peers, CombineWork& w) {
  CombineAcrossNodes c{peers, w};
  c.table = static_cast<const ForwardTable*>(w.handle->backend_state.get());
  if (!c.table || int(c.table->rows.size()) != c.N) {
    return fail(SY_ERROR_INTERNAL, rank_name(c.me) + ": the handle holds no forwarding table of a two-hop dispatch");
  }
  return w.internode_reduction == SY_INTERNODE_HIERARCHICAL ? c.hierarchical() : c.chain();
}

namespace {

// The chain (core/internode.h): a token's float partial goes from node to node in ascending
// order; the result is the one-node combine's bit for bit.
Error CombineAcrossNodes::chain() {
  const bool biased = w.bias0 || w.bias1;
  Partial acc(plan, w.hidden, w.topk);
  std::vector<uint8_t> row(size_t(plan.combine_row_bytes));

  // Starts: with biases, the partial a token begins with on its first node, unless that is ours.
  {
    EmulatedNic nic(peers.set().network[size_t(me)], peers.set().nic);
    for (int64_t t = 0; biased && t < T; ++t) {
      const int first = visits(t).next(-1);
      if (first < 0 || first == my_node) continue;
      acc.start(w.bias0.get(), w.bias1.get(), t);
      nic.put(peers.base(column(first)) + plan.net_offset(my_node, t), acc.data(), size_t(plan.net_partial_bytes));
    }
    nic.arrived();
    for (int k = 0; k < N; ++k) {
      if (k == my_node) continue;
      reinterpret_cast<uint32_t*>(peers.base(column(k)) + plan.off_chain_starts)[me] = biased ? 1 : 0;
      peers.signal(column(k), plan.off_chain_start_epoch);
    }
  }

  // The chain: this node's rows of every token this rank forwards, once the partials before them
  // are in.
  SY_TRY(peers.wait_sources(plan.off_combine_epoch, core::WaitRole::CombineNotify, only(node_ranks())));
  SY_TRY(peers.wait_sources(plan.off_chain_start_epoch, core::WaitRole::CombineNetwork,
                            only(columns([](int) { return true; }))));
  SY_TRY(peers.wait_sources(plan.off_chain_epoch, core::WaitRole::CombineNetwork,
                            only(columns([&](int k) { return k < my_node; }))));
  {
    uint8_t* base = peers.base(me);
    const auto* starts = reinterpret_cast<const uint32_t*>(base + plan.off_chain_starts);
    EmulatedNic nic(peers.set().network[size_t(me)], peers.set().nic);
    // One token of source node m: start, or take the partial the previous node put; fold this
    // node's rows in; pass it on, or round it and send it home.
    for_each_forwarded([&](int m, int64_t t, auto slot_of, bool first, int next) {
      if (first && m == my_node) {
        acc.start(w.bias0.get(), w.bias1.get(), t);
      } else if (first && !starts[column(m)]) {
        acc.zero();
      } else {
        acc.load(base + plan.net_offset(m, t));
      }
      add_rows(acc, m, slot_of);
      if (next >= 0) {
        nic.put(peers.base(column(next)) + plan.net_offset(m, t), acc.data(), size_t(plan.net_partial_bytes));
        return;
      }
      acc.result(row.data());
      if (m == my_node) {
        store_result(plan, row.data(), w, t);
      } else {
        nic.put(peers.base(column(m)) + plan.net_offset(m, t), row.data(), row.size());
      }
    });
    nic.arrived();
    for (int k = 0; k < N; ++k)
      if (k != my_node) peers.signal(column(k), plan.off_chain_epoch);
  }

  // Results: what the last node of each token sent here, or the biases alone.
  SY_TRY(peers.wait_sources(plan.off_chain_epoch, core::WaitRole::CombineNetwork,
                            only(columns([&](int k) { return k > my_node; }))));
  for (int64_t t = 0; t < T; ++t) {
    const int last = visits(t).last();
    if (last == my_node) continue;  // folded and stored in the chain
    if (last < 0) {
      acc.start(w.bias0.get(), w.bias1.get(), t);
      acc.result(row.data());
      store_result(plan, row.data(), w, t);
    } else {
      store_result(plan, peers.base(me) + plan.net_offset(my_node, t), w, t);
    }
  }
  return ok();
}

// Hierarchical (DeepEP's way): each node folds its rows of a token from zero and sends that
// partial home rounded to BF16, all nodes at once; home folds its biases, then the partials in
// node order, and rounds again. One network round and 2 bytes per channel, but the result
// depends on how the ranks are split into nodes.
Error CombineAcrossNodes::hierarchical() {
  Partial acc(plan, w.hidden, w.topk);
  std::vector<uint8_t> row(size_t(plan.combine_row_bytes));
  SY_TRY(peers.wait_sources(plan.off_combine_epoch, core::WaitRole::CombineNotify, only(node_ranks())));
  {
    EmulatedNic nic(peers.set().network[size_t(me)], peers.set().nic);
    // A partial from node k for source node m's token t lands at entry (k, t) of its source; the
    // own node's stays here, at (my_node, t).
    for_each_forwarded([&](int m, int64_t t, auto slot_of, bool, int) {
      acc.zero();
      add_rows(acc, m, slot_of);
      uint8_t* home = peers.base(column(m)) + plan.net_offset(my_node, t);
      if (m == my_node) {
        acc.result(home);
      } else {
        acc.result(row.data());
        nic.put(home, row.data(), row.size());
      }
    });
    nic.arrived();
    for (int k = 0; k < N; ++k)
      if (k != my_node) peers.signal(column(k), plan.off_chain_epoch);
  }
  SY_TRY(peers.wait_sources(plan.off_chain_epoch, core::WaitRole::CombineNetwork,
                            only(columns([](int) { return true; }))));
  for (int64_t t = 0; t < T; ++t) {
    const Visits v = visits(t);
    acc.start(w.bias0.get(), w.bias1.get(), t);
    for (int k = v.next(-1); k >= 0; k = v.next(k)) acc.add_row(peers.base(me) + plan.net_offset(k, t));
    acc.result(row.data());
    store_result(plan, row.data(), w, t);
  }
  return ok();
}

}  // namespace

}  // namespace sy::host
