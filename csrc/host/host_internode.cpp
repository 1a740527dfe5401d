// The two-hop normal mode of the host backend across nodes; core/internode.h has the protocol
// and the reasons for it. Every put onto another node goes through the emulated NIC into a
// bounded ring of the receiver (NetworkRings); the NIC counts it and, with a link model, delays
// the counter that publishes it. The small header words (counts, flags) go directly, as they do
// on one node.
//
// Each rank runs one loop per operation that never blocks on a single peer: it sends what its
// receivers have room for, takes what has arrived, and sleeps on its doorbell only when neither
// moved. Whatever waits for room passes things on towards higher nodes or to a ring that is
// always drained, so some rank can always move (core/internode.h: why the rings cannot deadlock).
#include "host_internode.h"

#include <algorithm>
#include <string>
#include <unordered_map>
#include <vector>

#include "../core/dtype.h"
#include "../core/internode.h"
#include "../core/routing.h"
#include "emulated_nic.h"

namespace sy::host {

namespace {

using core::kKeep;
using core::kPassOn;

std::string rank_name(int r) { return "rank " + std::to_string(r); }

// [R] bytes: 1 for the ranks a wait is for.
Peers::WaitPolicy only(const std::vector<uint8_t>& ranks) {
  Peers::WaitPolicy p;
  p.only = ranks.data();
  return p;
}

// What a forwarder keeps of a two-hop dispatch for the combine of the same handle (a later
// dispatch reuses the rings): per source node, one row per network record it forwarded.
struct ForwardTable {
  static constexpr int kToken = 0, kNext = 1, kPrev = 2, kSlots = 3;
  int stride = 0;                          // kSlots + ranks per node
  std::vector<std::vector<int32_t>> rows;  // [source node][record * stride + field]
};

// This rank's side of the network rings in one operation: it puts entries into the rings its
// column peers on other nodes keep for its node, and takes entries from the rings it keeps for
// theirs. Indexed by the peer's node; lanes as in core::BufferPlan::off_net.
class NetworkRings {
 public:
  NetworkRings(Peers& peers, EmulatedNic& nic)
      : peers_(peers), nic_(nic), plan_(peers.plan()), me_(peers.rank()), P_(plan_.ranks_per_node),
        my_node_(core::node_of(me_, P_)), sent_(size_t(plan_.nodes) * core::kNetLanes, 0),
        published_(sent_), taken_(sent_), credited_(sent_) {}

  int column(int node) const { return core::forwarder(node, me_, P_); }
  uint32_t sent(int node, int lane) const { return sent_[at(node, lane)]; }
  uint32_t taken(int node, int lane) const { return taken_[at(node, lane)]; }

  // Starts the operation's counters at every column peer: tails and credits 0, then the epochs
  // that make them this operation's (the counters before the epoch, so nobody reads a stale one).
  void open() {
    for (int n = 0; n < plan_.nodes; ++n) {
      if (n == my_node_) continue;
      const int c = column(n);
      for (int lane = 0; lane < core::kNetLanes; ++lane) {
        store_release(peers_.word(c, plan_.net_counter(plan_.off_net_tail, lane, me_)), 0u);
        store_release(peers_.word(c, plan_.net_counter(plan_.off_net_credit, lane, me_)), 0u);
      }
      store_release(peers_.word(c, plan_.off_net_credit_epoch + 4ull * uint64_t(me_)), peers_.epoch());
      peers_.signal(c, plan_.off_net_epoch);
    }
  }

  // Sender: whether the ring of `node`'s column peer has room for one more entry of `lane`.
  bool has_room(int node, int lane) const {
    const uint32_t used = sent(node, lane) - credit(node, lane);
    return used < uint32_t(plan_.net_ring_entries);
  }
  // Puts an entry (room checked first) into that ring.
  void put(int node, int lane, const void* entry, size_t bytes) {
    uint32_t& i = sent_[at(node, lane)];
    nic_.put(peers_.base(column(node)) + plan_.net_entry(my_node_, lane, i), entry, bytes);
    ++i;
  }
  // What `node`'s column peer has taken from its ring of `lane` (0 before it has said so).
  uint32_t credit(int node, int lane) const {
    const int c = column(node);
    if (load_acquire(peers_.word(me_, plan_.off_net_credit_epoch + 4ull * uint64_t(c))) != peers_.epoch()) return 0;
    return load_acquire(peers_.word(me_, plan_.net_counter(plan_.off_net_credit, lane, c)));
  }

  // Receiver: the next entry of `lane` from `node`'s column peer, or nullptr while it has not
  // arrived. A counter that claims more than the ring holds is an error (it came from outside).
  Error next(int node, int lane, const uint8_t** entry) {
    *entry = nullptr;
    const int c = column(node);
    if (peers_.flag_from(c, plan_.off_net_epoch) != peers_.epoch()) return ok();
    const uint32_t tail = load_acquire(peers_.word(me_, plan_.net_counter(plan_.off_net_tail, lane, c)));
    const uint32_t have = tail - taken(node, lane);
    if (have > uint32_t(plan_.net_ring_entries)) {
      return fail(SY_ERROR_INTERNAL, rank_name(me_) + ": " + rank_name(c) + " claims " + std::to_string(have) +
                                         " entries in a network ring of " + std::to_string(plan_.net_ring_entries));
    }
    if (have > 0) *entry = peers_.base(me_) + plan_.net_entry(node, lane, taken(node, lane));
    return ok();
  }
  void take(int node, int lane) { ++taken_[at(node, lane)]; }

  // Publishes what changed: the credits of the rings this rank took from, then the tails of the
  // rings it put into, once the NIC says the entries would be there; rings the doorbells.
  void publish() {
    publish_counters(plan_.off_net_credit, taken_, credited_);
    bool tails = false;
    for (size_t i = 0; i < sent_.size(); ++i) tails = tails || sent_[i] != published_[i];
    if (!tails) return;
    nic_.arrived();
    publish_counters(plan_.off_net_tail, sent_, published_);
  }

  // Whom a stalled loop waits for: `node`'s column peer, for room (its credit) or for entries.
  Peers::Stall waiting_for_room(int node, int lane) const {
    return {column(node), int64_t(sent(node, lane)) - plan_.net_ring_entries + 1, int64_t(credit(node, lane)),
            "room in its network ring, entries it has taken"};
  }
  Peers::Stall waiting_for_entries(int node, int lane, int64_t expected) const {
    return {column(node), expected, int64_t(taken(node, lane)), "its network entries, taken here"};
  }

 private:
  size_t at(int node, int lane) const { return size_t(node) * core::kNetLanes + size_t(lane); }
  // Stores each changed counter of `now` into the column peers' array at `base` and rings them.
  void publish_counters(uint64_t base, const std::vector<uint32_t>& now, std::vector<uint32_t>& told) {
    for (int n = 0; n < plan_.nodes; ++n) {
      if (n == my_node_) continue;
      bool rang = false;
      for (int lane = 0; lane < core::kNetLanes; ++lane) {
        const size_t i = at(n, lane);
        if (now[i] == told[i]) continue;
        store_release(peers_.word(column(n), plan_.net_counter(base, lane, me_)), now[i]);
        told[i] = now[i];
        rang = true;
      }
      if (rang) peers_.ring(column(n));
    }
  }
  Peers& peers_;
  EmulatedNic& nic_;
  const core::BufferPlan& plan_;
  const int me_, P_, my_node_;
  std::vector<uint32_t> sent_, published_, taken_, credited_;
};

// What one pass of an operation's network loop found: whether it moved anything, and if
// something is left, whom it waits for (the first it met).
struct Pass {
  bool moved = false, done = true;
  Peers::Stall stall;
  void wait(const Peers::Stall& s) {
    done = false;
    if (stall.peer < 0) stall = s;
  }
};

// Runs an operation's network loop (Peers::progress): `pass` does what it can and says so in its
// Pass; the rings publish after each pass.
template <class PassFn>
Error run_passes(Peers& peers, NetworkRings& rings, core::WaitRole role, PassFn pass) {
  Pass last;
  return peers.progress(
      role,
      [&](Peers::Step* step) -> Error {
        last = Pass{};
        SY_TRY(pass(last));
        rings.publish();
        *step = last.done ? Peers::Step::Done : last.moved ? Peers::Step::Moved : Peers::Step::Idle;
        return ok();
      },
      [&] { return last.stall; });
}

}  // namespace

Error exchange_network_records(Peers& peers, DispatchHandle& handle, int64_t num_tokens, const int32_t* slots,
                               const RecordWriter& write_record) {
  const core::BufferPlan& plan = peers.plan();
  const int R = peers.num_ranks(), me = peers.rank(), P = plan.ranks_per_node, N = plan.nodes;
  const int my_node = core::node_of(me, P);
  EmulatedNic nic(peers.set().network[size_t(me)], peers.set().nic);
  NetworkRings rings(peers, nic);
  std::vector<uint8_t> staged(size_t(plan.net_record_bytes));
  auto* staged_slots = reinterpret_cast<int32_t*>(staged.data() + plan.net_slots);

  // This rank's own node takes no network: its records go straight to their ranks.
  std::vector<int32_t> direct(size_t(P), 0);
  std::vector<std::vector<int64_t>> tokens(static_cast<size_t>(N));  // per other node: the tokens going there
  for (int64_t t = 0; t < num_tokens; ++t) {
    const core::TokenNodes v{slots + t * R, P, N};
    for (int n = v.next(-1); n >= 0; n = v.next(n)) {
      if (n != my_node) {
        tokens[size_t(n)].push_back(t);
        continue;
      }
      write_record(staged.data(), t);
      for (int q = 0; q < P; ++q) {
        const int32_t slot = slots[t * R + n * P + q];
        if (slot < 0) continue;
        std::memcpy(peers.base(n * P + q) + plan.record_offset(me, slot), staged.data(), size_t(plan.record_bytes));
        ++direct[q];
      }
    }
  }
  for (int q = 0; q < P; ++q) i32_at(peers.base(my_node * P + q), plan.off_forwarded)[me] = direct[q];
  for (int n = 0; n < N; ++n)
    if (n != my_node) i32_at(peers.base(rings.column(n)), plan.off_net_counts)[me] = int32_t(tokens[size_t(n)].size());
  rings.open();

  auto table = std::make_shared<ForwardTable>();
  table->stride = ForwardTable::kSlots + P;
  table->rows.resize(size_t(N));
  std::vector<int32_t> announced(size_t(N), -1);  // records each source node puts here (-1: not known yet)
  std::vector<std::vector<int32_t>> delivered(size_t(N), std::vector<int32_t>(size_t(P), 0));

  // Forwards one record of source node m: to each rank of this node it is for, at its slot.
  auto forward = [&](int m, const uint8_t* rec) -> Error {
    const int src = rings.column(m);
    const uint32_t j = rings.taken(m, kPassOn);
    const auto* rec_slots = reinterpret_cast<const int32_t*>(rec + plan.net_slots);
    // Written by another process: what indexes a region is bounded before it is used.
    const int32_t token = *reinterpret_cast<const int32_t*>(rec + plan.rec_src_idx);
    const int32_t next = *reinterpret_cast<const int32_t*>(rec + plan.net_chain_next);
    const int32_t prev = *reinterpret_cast<const int32_t*>(rec + plan.net_chain_prev);
    const std::string record = "network record " + std::to_string(j) + " of " + rank_name(src);
    if (token < 0 || token >= plan.max_tokens_per_rank || (next != -1 && (next <= my_node || next >= N)) ||
        (prev != -1 && (prev < 0 || prev >= my_node))) {
      return fail(SY_ERROR_INTERNAL, rank_name(me) + ": " + record + " names token " + std::to_string(token) +
                                         ", next node " + std::to_string(next) + ", previous node " +
                                         std::to_string(prev) + ": out of range");
    }
    std::vector<int32_t>& rows = table->rows[size_t(m)];
    rows.insert(rows.end(), {token, next, prev});
    for (int q = 0; q < P; ++q) {
      const int32_t slot = rec_slots[q];
      rows.push_back(slot < 0 ? -1 : slot);
      if (slot < 0) continue;
      if (slot >= plan.max_tokens_per_rank) {
        return fail(SY_ERROR_INTERNAL, rank_name(me) + ": " + record + " names slot " + std::to_string(slot) +
                                           ", beyond the " + std::to_string(plan.max_tokens_per_rank) +
                                           " a buffer holds");
      }
      std::memcpy(peers.base(my_node * P + q) + plan.record_offset(src, slot), rec, size_t(plan.record_bytes));
      ++delivered[size_t(m)][size_t(q)];
    }
    return ok();
  };

  std::vector<size_t> cursor(size_t(N), 0);  // per other node: tokens put so far
  SY_TRY(run_passes(peers, rings, core::WaitRole::DispatchNetwork, [&](Pass& pass) -> Error {
    for (int n = 0; n < N; ++n) {  // hop 1: this rank's records, as the receivers have room
      const std::vector<int64_t>& list = tokens[size_t(n)];
      for (; cursor[size_t(n)] < list.size() && rings.has_room(n, kPassOn); ++cursor[size_t(n)], pass.moved = true) {
        const int64_t t = list[cursor[size_t(n)]];
        const core::TokenNodes v{slots + t * R, P, N};
        write_record(staged.data(), t);
        for (int q = 0; q < P; ++q) staged_slots[q] = slots[t * R + n * P + q];
        *reinterpret_cast<int32_t*>(staged.data() + plan.net_chain_next) = v.next(n);
        *reinterpret_cast<int32_t*>(staged.data() + plan.net_chain_prev) = v.prev(n);
        rings.put(n, kPassOn, staged.data(), staged.size());
      }
      if (cursor[size_t(n)] < list.size()) pass.wait(rings.waiting_for_room(n, kPassOn));
    }
    for (int m = 0; m < N; ++m) {  // hop 2: the records this rank forwards, as they arrive
      if (m == my_node) continue;
      const int src = rings.column(m);
      if (announced[size_t(m)] < 0 && peers.flag_from(src, plan.off_net_epoch) == peers.epoch()) {
        const int32_t n = i32_at(peers.base(me), plan.off_net_counts)[src];
        if (n < 0 || n > plan.max_tokens_per_rank) {
          return fail(SY_ERROR_INTERNAL, rank_name(me) + ": " + rank_name(src) + " announced " +
                                             std::to_string(n) + " network records, more than a buffer holds");
        }
        announced[size_t(m)] = n;
      }
      for (const uint8_t* rec = nullptr; announced[size_t(m)] >= 0 &&
                                         int64_t(rings.taken(m, kPassOn)) < announced[size_t(m)];) {
        SY_TRY(rings.next(m, kPassOn, &rec));
        if (!rec) break;
        SY_TRY(forward(m, rec));
        rings.take(m, kPassOn);
        pass.moved = true;
      }
      if (announced[size_t(m)] < 0 || int64_t(rings.taken(m, kPassOn)) < announced[size_t(m)]) pass.wait(rings.waiting_for_entries(m, kPassOn, std::max(announced[size_t(m)], 0)));
    }
    return ok();
  }));

  for (int m = 0; m < N; ++m) {
    if (m == my_node) continue;
    for (int q = 0; q < P; ++q)
      i32_at(peers.base(my_node * P + q), plan.off_forwarded)[rings.column(m)] = delivered[size_t(m)][size_t(q)];
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

// One token's float accumulator: channels, then top-k weights, laid out as a combine entry's
// payload (plan.net_partial_weights) behind its header, so that it is put as it is.
class Partial {
 public:
  Partial(const core::BufferPlan& plan, int hidden, int topk)
      : plan_(plan), hidden_(hidden), topk_(topk), words_(size_t(plan.net_partial_bytes) / 4, 0) {}

  void zero() { std::fill(words_.begin() + kHeaderWords, words_.end(), 0u); }
  // The contract's start: 0 + bias0 + bias1, top-k weights from 0.
  void start(const Tensor* bias0, const Tensor* bias1, int64_t t) {
    zero();
    for (const Tensor* b : {bias0, bias1}) {
      if (!b) continue;
      const auto* v = reinterpret_cast<const uint16_t*>(b->element(t));
      for (int c = 0; c < hidden_; ++c) channels()[c] += core::bf16_to_float(v[c]);
    }
  }
  // A start or partial entry's payload.
  void load(const uint8_t* entry) {
    std::memcpy(channels(), entry + plan_.net_payload, size_t(plan_.net_partial_bytes - plan_.net_payload));
  }
  // A combine row folded in: its BF16 channels and its top-k weights.
  void add_row(const uint8_t* row) {
    const auto* v = reinterpret_cast<const uint16_t*>(row + plan_.row_payload);
    for (int c = 0; c < hidden_; ++c) channels()[c] += core::bf16_to_float(v[c]);
    const auto* wv = reinterpret_cast<const float*>(row + plan_.row_topk_weights);
    for (int k = 0; k < topk_; ++k) weights()[k] += wv[k];
  }
  // Rounded once, as a combine row.
  void result(uint8_t* row) const {
    auto* out = reinterpret_cast<uint16_t*>(row + plan_.row_payload);
    for (int c = 0; c < hidden_; ++c) out[c] = core::float_to_bf16(channels()[c]);
    std::memcpy(row + plan_.row_topk_weights, weights(), 4 * size_t(topk_));
  }
  // The whole entry: header (kind, source node, token), then the partial.
  const void* entry(core::NetEntry kind, int node, int64_t t) {
    words_[0] = uint32_t(kind);
    words_[1] = uint32_t(node);
    words_[2] = uint32_t(t);
    words_[3] = 0;
    return words_.data();
  }

 private:
  static constexpr int kHeaderWords = core::kNetEntryHeaderBytes / 4;
  float* channels() { return reinterpret_cast<float*>(words_.data() + kHeaderWords); }
  const float* channels() const { return reinterpret_cast<const float*>(words_.data() + kHeaderWords); }
  float* weights() { return channels() + plan_.net_partial_weights / 4; }
  const float* weights() const { return channels() + plan_.net_partial_weights / 4; }
  const core::BufferPlan& plan_;
  int hidden_, topk_;
  std::vector<uint32_t> words_;
};

// A result entry being written: header, then a combine row.
struct ResultEntry {
  explicit ResultEntry(const core::BufferPlan& plan) : plan(plan), bytes(size_t(plan.net_result_bytes)) {}
  uint8_t* row() { return bytes.data() + plan.net_payload; }
  const void* entry(core::NetEntry kind, int node, int64_t t) {
    auto* w = reinterpret_cast<uint32_t*>(bytes.data());
    w[0] = uint32_t(kind);
    w[1] = uint32_t(node);
    w[2] = uint32_t(t);
    w[3] = 0;
    return bytes.data();
  }
  const core::BufferPlan& plan;
  std::vector<uint8_t> bytes;
};

// The source's results: BF16 channels into `out`, top-k weights into `out_weights`.
void store_result(const core::BufferPlan& plan, const uint8_t* row, CombineWork& w, int64_t t) {
  std::memcpy(w.out->element(t), row + plan.row_payload, size_t(w.hidden) * 2);
  const auto* wv = reinterpret_cast<const float*>(row + plan.row_topk_weights);
  for (int k = 0; k < w.topk; ++k) *w.out_topk_weights->at<float>(t, k) = wv[k];
}

// A token this rank forwards in a combine: its source node, its slots at this node's ranks,
// and the nodes before and after this one on its way (-1: none).
struct Forwarded {
  int m = 0;
  int64_t t = 0;
  int prev = -1, next = -1;
  const int32_t* slots = nullptr;  // [ranks per node]
  bool done = false;
};

// What both reductions across nodes work with: this rank's place, the tokens it forwards (the
// handle's forwarding table, and its own tokens' routing), and the rings.
struct CombineAcrossNodes {
  Peers& peers;
  CombineWork& w;
  const core::BufferPlan& plan = peers.plan();
  const int R = peers.num_ranks(), me = peers.rank(), P = plan.ranks_per_node, N = plan.nodes;
  const int my_node = core::node_of(me, P);
  const int32_t* slots = reinterpret_cast<const int32_t*>(w.handle->send_slot->data());
  const int64_t T = w.handle->num_tokens;
  EmulatedNic nic{peers.set().network[size_t(me)], peers.set().nic};
  NetworkRings rings{peers, nic};
  std::vector<Forwarded> forwarded{};  // own node's tokens first, then each other source node's
  std::unordered_map<int64_t, size_t> index{};  // (source node, token) -> forwarded
  Partial acc{plan, w.hidden, w.topk};
  ResultEntry result{plan};

  int column(int node) const { return core::forwarder(node, me, P); }  // this rank's peer on `node`
  core::TokenNodes visits(int64_t t) const { return core::TokenNodes{slots + t * R, P, N}; }
  int64_t key(int m, int64_t t) const { return int64_t(m) * plan.max_tokens_per_rank + t; }

  Error load(const ForwardTable& table) {
    for (int64_t t = 0; t < T; ++t) {
      const core::TokenNodes v = visits(t);
      if (v.at(my_node)) forwarded.push_back({my_node, t, v.prev(my_node), v.next(my_node), slots + t * R + my_node * P});
    }
    for (int m = 0; m < N; ++m) {
      if (m == my_node) continue;
      const std::vector<int32_t>& rows = table.rows[size_t(m)];
      for (size_t j = 0; j < rows.size(); j += size_t(table.stride)) {
        const int32_t* e = rows.data() + j;
        forwarded.push_back({m, e[ForwardTable::kToken], e[ForwardTable::kPrev], e[ForwardTable::kNext],
                             e + ForwardTable::kSlots});
      }
    }
    for (size_t i = 0; i < forwarded.size(); ++i) index[key(forwarded[i].m, forwarded[i].t)] = i;
    return ok();
  }
  // Adds this node's rows of a forwarded token to `acc`, ranks ascending.
  void add_rows(const Forwarded& f) {
    for (int q = 0; q < P; ++q)
      if (f.slots[q] >= 0) acc.add_row(peers.base(me) + plan.combine_row_offset(f.m * P + q, f.slots[q]));
  }
  // An entry of `lane` from `node` as this rank expects it: its kind, a token of a source node
  // it forwards (or, `own`, one of its own), else a protocol error naming the sender.
  Error check_entry(const uint8_t* e, int node, core::NetEntry kind, bool own, int* m, int64_t* t) const {
    const auto* h = reinterpret_cast<const uint32_t*>(e);
    *m = int(h[1]);
    *t = int64_t(int32_t(h[2]));
    const bool known = own ? (*m == my_node && *t >= 0 && *t < T) : index.count(key(*m, *t)) > 0;
    if (h[0] == uint32_t(kind) && *m >= 0 && *m < N && *t >= 0 && *t < plan.max_tokens_per_rank && known) return ok();
    return unexpected(e, node);
  }
  Error unexpected(const uint8_t* e, int node) const {
    const auto* h = reinterpret_cast<const uint32_t*>(e);
    return fail(SY_ERROR_INTERNAL, rank_name(me) + ": " + rank_name(column(node)) + " put a network entry of kind " +
                                       std::to_string(h[0]) + " for token " + std::to_string(int32_t(h[2])) +
                                       " of node " + std::to_string(h[1]) + ", which this rank does not expect now");
  }

  Error chain();
  Error hierarchical();
};

}  // namespace

Error combine_across_nodes(Peers& peers, CombineWork& w) {
  CombineAcrossNodes c{peers, w};
  const auto* table = static_cast<const ForwardTable*>(w.handle->backend_state.get());
  if (!table || int(table->rows.size()) != c.N) {
    return fail(SY_ERROR_INTERNAL, rank_name(c.me) + ": the handle holds no forwarding table of a two-hop dispatch");
  }
  SY_TRY(c.load(*table));
  return w.internode_reduction == SY_INTERNODE_HIERARCHICAL ? c.hierarchical() : c.chain();
}

namespace {

// The chain (core/internode.h): a token's float partial goes from node to node in ascending
// order; the last node rounds it and sends the result home. The result is the one-node
// combine's bit for bit.
Error CombineAcrossNodes::chain() {
  const bool biased = w.bias0 || w.bias1;
  // Whether a source's tokens start from biases it sends (then their first node waits for them).
  for (int k = 0; k < N; ++k) {
    if (k == my_node) continue;
    store_release(peers.word(column(k), plan.off_chain_starts + 4ull * uint64_t(me)), biased ? 1u : 0u);
    peers.signal(column(k), plan.off_chain_start_epoch);
  }
  std::vector<uint8_t> node(size_t(R), 0), others(size_t(R), 0);
  for (int q = 0; q < P; ++q) node[size_t(my_node * P + q)] = 1;
  for (int k = 0; k < N; ++k)
    if (k != my_node) others[size_t(column(k))] = 1;
  SY_TRY(peers.wait_sources(plan.off_combine_epoch, core::WaitRole::CombineNotify, only(node)));
  SY_TRY(peers.wait_sources(plan.off_chain_start_epoch, core::WaitRole::CombineNetwork, only(others)));
  const auto* starts = reinterpret_cast<const uint32_t*>(peers.base(me) + plan.off_chain_starts);
  rings.open();

  // What this rank sends on its own: the starts of its tokens whose first node is another, and
  // the tokens it forwards that begin here (no partial to wait for). The rest it does as their
  // partials arrive; and it keeps the results of its own tokens.
  std::vector<int64_t> own_starts;
  std::vector<size_t> begin_here;
  std::vector<int64_t> expected(size_t(N) * core::kNetLanes, 0);  // [node][lane]: entries to take
  const auto expect = [&](int node, int lane) { expected[size_t(node) * core::kNetLanes + size_t(lane)] += 1; };
  // What a forwarded token starts from here (the node that sends it starts if its source does).
  const auto from = [&](const Forwarded& f) {
    return core::chain_from(f.m, f.prev, my_node, f.m != my_node && starts[column(f.m)] != 0);
  };
  for (int64_t t = 0; t < T; ++t) {
    const core::TokenNodes v = visits(t);
    if (v.next(-1) < 0) {  // goes nowhere: the biases alone
      acc.start(w.bias0.get(), w.bias1.get(), t);
      acc.result(result.row());
      store_result(plan, result.row(), w, t);
      continue;
    }
    if (core::chain_start_node(v, my_node, biased) >= 0) own_starts.push_back(t);
    core::own_token_arrivals(v, my_node, false, expect);
  }
  for (size_t i = 0; i < forwarded.size(); ++i) {
    const Forwarded& f = forwarded[i];
    if (const int k = core::chain_from_node(from(f), f.m, f.prev); k >= 0) {
      expect(k, kPassOn);
    } else {
      begin_here.push_back(i);
    }
  }

  // Folds this node's rows into the partial of forwarded token f and sends it on: to the next
  // node, home as a result, or (its own token, here last) into the output. False: no room yet.
  auto pass_on = [&](Forwarded& f) -> bool {
    const core::NetHop to = core::chain_onward(f.m, f.next, my_node);
    if (to.node >= 0 && !rings.has_room(to.node, to.lane)) return false;
    add_rows(f);
    if (to.lane == kPassOn) {
      rings.put(to.node, to.lane, acc.entry(core::NetEntry::Partial, f.m, f.t), size_t(plan.net_partial_bytes));
    } else {
      acc.result(result.row());
      if (to.node < 0) {
        store_result(plan, result.row(), w, f.t);
      } else {
        rings.put(to.node, to.lane, result.entry(core::NetEntry::Result, f.m, f.t), result.bytes.size());
      }
    }
    f.done = true;
    return true;
  };
  // Whom pass_on waits for when it has no room.
  auto room_for = [&](const Forwarded& f) {
    const core::NetHop to = core::chain_onward(f.m, f.next, my_node);
    return rings.waiting_for_room(to.node, to.lane);
  };

  std::vector<uint8_t> stored(size_t(T), 0);  // results kept: a second one for a token is refused
  size_t next_start = 0, next_begin = 0;
  return run_passes(peers, rings, core::WaitRole::CombineNetwork, [&](Pass& pass) -> Error {
    for (; next_start < own_starts.size(); ++next_start, pass.moved = true) {
      const int64_t t = own_starts[next_start];
      const int first = core::chain_start_node(visits(t), my_node, biased);
      if (!rings.has_room(first, kPassOn)) {
        pass.wait(rings.waiting_for_room(first, kPassOn));
        break;
      }
      acc.start(w.bias0.get(), w.bias1.get(), t);
      rings.put(first, kPassOn, acc.entry(core::NetEntry::Start, my_node, t), size_t(plan.net_partial_bytes));
    }
    for (; next_begin < begin_here.size(); ++next_begin, pass.moved = true) {
      Forwarded& f = forwarded[begin_here[next_begin]];
      if (f.m == my_node) {
        acc.start(w.bias0.get(), w.bias1.get(), f.t);
      } else {
        acc.zero();
      }
      if (!pass_on(f)) {
        pass.wait(room_for(f));
        break;
      }
    }
    for (int k = 0; k < N; ++k) {
      if (k == my_node) continue;
      // Starts and partials from node k: fold and pass on, in the order they came.
      for (const uint8_t* e = nullptr;
           int64_t(rings.taken(k, kPassOn)) < expected[size_t(k) * core::kNetLanes + kPassOn];) {
        SY_TRY(rings.next(k, kPassOn, &e));
        if (!e) break;
        int m;
        int64_t t;
        const auto kind = core::NetEntry(reinterpret_cast<const uint32_t*>(e)[0]);
        SY_TRY(check_entry(e, k, kind == core::NetEntry::Start ? kind : core::NetEntry::Partial, false, &m, &t));
        Forwarded& f = forwarded[index[key(m, t)]];
        if (f.done || !core::chain_accepts(from(f), uint32_t(kind), f.m, f.prev, k)) return unexpected(e, k);
        acc.load(e);
        if (!pass_on(f)) {
          pass.wait(room_for(f));
          break;
        }
        rings.take(k, kPassOn);
        pass.moved = true;
      }
      // Results of this rank's own tokens from node k: kept.
      for (const uint8_t* e = nullptr;
           int64_t(rings.taken(k, kKeep)) < expected[size_t(k) * core::kNetLanes + kKeep];) {
        SY_TRY(rings.next(k, kKeep, &e));
        if (!e) break;
        int m;
        int64_t t;
        SY_TRY(check_entry(e, k, core::NetEntry::Result, true, &m, &t));
        if (core::chain_result_node(visits(t), my_node) != k || stored[size_t(t)]) return unexpected(e, k);
        store_result(plan, e + plan.net_payload, w, t);
        stored[size_t(t)] = 1;
        rings.take(k, kKeep);
        pass.moved = true;
      }
      for (int lane = 0; lane < core::kNetLanes; ++lane) {
        const int64_t want = expected[size_t(k) * core::kNetLanes + lane];
        if (int64_t(rings.taken(k, lane)) >= want) continue;
        pass.wait(rings.waiting_for_entries(k, lane, want));
      }
    }
    return ok();
  });
}

// Hierarchical (DeepEP's way): each node folds its rows of a token from zero and sends that
// partial home rounded to BF16, all nodes at once; home folds its biases, then the partials in
// node order, and rounds again. One network round and 2 bytes per channel, but the result
// depends on how the ranks are split into nodes.
Error CombineAcrossNodes::hierarchical() {
  std::vector<uint8_t> node(size_t(R), 0);
  for (int q = 0; q < P; ++q) node[size_t(my_node * P + q)] = 1;
  SY_TRY(peers.wait_sources(plan.off_combine_epoch, core::WaitRole::CombineNotify, only(node)));
  rings.open();

  // Per source node: the tokens this rank forwards there, in order; home's own come from its
  // rows when it folds them.
  std::vector<std::vector<size_t>> to_home(static_cast<size_t>(N));
  for (size_t i = 0; i < forwarded.size(); ++i) {
    const core::NetHop to = core::forwarded_departure(forwarded[i].m, forwarded[i].next, my_node, true);
    if (to.node >= 0) to_home[size_t(to.node)].push_back(i);
  }
  std::vector<size_t> sent(size_t(N), 0);
  std::vector<int64_t> expected(size_t(N), 0);  // per node: partials of this rank's tokens to take
  for (int64_t t = 0; t < T; ++t)
    core::own_token_arrivals(visits(t), my_node, true, [&](int k, int) { expected[size_t(k)] += 1; });
  int64_t t = 0;  // home: the token being folded, and the node it needs next (-2: not begun)
  int k_next = -2;
  Partial home(plan, w.hidden, w.topk);
  return run_passes(peers, rings, core::WaitRole::CombineNetwork, [&](Pass& pass) -> Error {
    for (int m = 0; m < N; ++m) {  // this node's partials, home to each source node
      const std::vector<size_t>& list = to_home[size_t(m)];
      for (; sent[size_t(m)] < list.size() && rings.has_room(m, kKeep); ++sent[size_t(m)], pass.moved = true) {
        const Forwarded& f = forwarded[list[sent[size_t(m)]]];
        acc.zero();
        add_rows(f);
        acc.result(result.row());
        rings.put(m, kKeep, result.entry(core::NetEntry::NodePartial, m, f.t), result.bytes.size());
      }
      if (sent[size_t(m)] < list.size()) pass.wait(rings.waiting_for_room(m, kKeep));
    }
    for (; t < T; ++t, k_next = -2, pass.moved = true) {  // home: this rank's tokens, in order
      const core::TokenNodes v = visits(t);
      if (k_next == -2) {
        home.start(w.bias0.get(), w.bias1.get(), t);
        k_next = v.next(-1);
      }
      for (; k_next >= 0; k_next = v.next(k_next)) {
        if (k_next == my_node) {
          acc.zero();
          add_rows(forwarded[index[key(my_node, t)]]);
          acc.result(result.row());
          home.add_row(result.row());
          continue;
        }
        const uint8_t* e = nullptr;
        SY_TRY(rings.next(k_next, kKeep, &e));
        if (!e) break;
        int m;
        int64_t et;
        SY_TRY(check_entry(e, k_next, core::NetEntry::NodePartial, true, &m, &et));
        if (et != t) return unexpected(e, k_next);
        home.add_row(e + plan.net_payload);
        rings.take(k_next, kKeep);
        pass.moved = true;
      }
      if (k_next >= 0) {
        pass.wait(rings.waiting_for_entries(k_next, kKeep, expected[size_t(k_next)]));
        break;
      }
      home.result(result.row());
      store_result(plan, result.row(), w, t);
    }
    return ok();
  });
}

}  // namespace

}  // namespace sy::host
