// The two-hop combine on the CUDA backend, the chain and the hierarchical reduction
// (core/internode.h has the protocol and why it cannot deadlock, transport/rdma.h the network).
// After the combine's barrier, one block per rank takes every token that visits another node; the
// grid's reduction (normal_combine.cu) takes the tokens that stay on this rank's node, as on one
// node (hierarchical: the node's part rounded, then added to the biases).
//
// A token's float partial travels its nodes in ascending order, in the column of its source: the
// forwarder on each node adds the rows of its node's ranks, pulled from their combine inputs, in
// rank order, and puts the partial to the next node, or on the last one rounds it once and puts
// the result home. That is the one-hop reduction's order (biases, then ranks ascending, rounded
// once), so the results are the one-node results bit for bit, whatever the node split.
//
// Thread 0 schedules, the block works: thread 0 picks one step that can go now (nothing waits for
// one peer while another could be served), the block folds the token's channels (8 per thread at
// a time) into its staging slot (or the output) and thread 0 books it. Entries go as dispatch
// records do: packed at their lane's size (NetworkArgs::ring_combine), consecutive entries for one
// ring put as one run of up to put_run_limit (never past the ring's end; the last entry for a ring
// ends its run), credits for taken entries as one signal; thread 0 flushes what is staged or owed
// before it waits for anything and at the end, so no peer waits on what this rank holds back.
// The steps:
//   start    an own token whose first node is another, with biases: 0 + bias0 + bias1, to it
//   begin    a token whose way begins here and needs nothing from the network: this rank's own
//            (from its biases) or another node's source without biases (from zero)
//   pass on  a start or partial that landed in lane 0: its node's rows added, on to the next
//            node (lane 0), home (lane 1) or, an own token, into the output
//   keep     a result that landed in lane 1: into the output
// Hierarchical: begin is this node's part of another node's token, from zero, rounded, home in
// lane 1; home takes an own token once every other node's part of it has landed (each node sends
// them in token order: they are its ring's heads), folds the biases, then the parts in node order
// (its own node's folded here), and rounds again.
// What goes where and how many come is known from the handle's forwarding table (ForwardTable,
// written by the dispatch) and the routing; an entry naming a token the table does not lead to
// from that sender, or one already taken, is refused (kernel_report.cu, -8).
//
// Every rank announces, before its started flag, how many entries it puts to each column peer per
// lane; a rank checks a peer's counts against what it expects as soon as that peer has started, so
// ranks that disagree (handles of different dispatches) fail at once, naming each other. A stall
// longer than the deadline names a rank that never started the hop, else the peer it waited for;
// a failure gives the buffer up, as in dispatch (normal_network.cu): the rings' counters are out
// of step.
#include <cstdint>

#include "../core/internode.h"
#include "../core/routing.h"
#include "combine_rows.cuh"
#include "network_state.cuh"
#include "normal_kernels.h"

namespace sy::cuda {

namespace {

constexpr auto kHop = core::WaitRole::CombineNetwork;

enum class Step : int32_t { Idle = 0, Start, Begin, PassOn, Keep, Home, Done, Failed };
// Where a step's accumulator starts.
enum class From : int32_t { Zero = 0, Biases, Entry };

// One step, as thread 0 decided it for the block.
struct Decision {
  Step step;
  From from;
  core::NetEntry kind;  // of the entry it puts
  int32_t m;        // the token's source node
  int32_t t;        // the token
  int32_t node_in;  // the node whose ring the entry came from (pass on, keep); -1: none
  int32_t to;       // the node it goes to; -1: this rank's output
  int32_t lane;     // the lane it goes in
  int32_t source;   // the token's source rank
  uint64_t in_off;  // the entry (pass on, keep), in this rank's window
  uint64_t out_off;  // the staging slot (to >= 0), in this rank's window
  int32_t* entry;   // the token's forwarding entry (begin, pass on)
};

// Thread 0's bookkeeping, in shared memory.
struct Chain {
  NetState st;
  Decision d;
  int64_t rows[kMaxSources];  // the token's received row at each rank of this node (-1: none)
  Published pub[kMaxSources];  // what the ranks of this node published (their combine inputs)
  uint64_t sent[core::kNetLanes][kMaxNodes], taken[core::kNetLanes][kMaxNodes];
  // Entries put so far (those in [posted, sent) are staged, waiting to go as one run), and credits
  // owed for entries taken, not signalled yet, per lane and node.
  uint64_t posted[core::kNetLanes][kMaxNodes];
  uint64_t first_sent[core::kNetLanes][kMaxNodes];  // sent when this combine began
  int32_t owed[core::kNetLanes][kMaxNodes];
  uint64_t credit_seen[core::kNetLanes][kMaxNodes], landed_seen[core::kNetLanes][kMaxNodes];  // signals last read
  int32_t expected[core::kNetLanes][kMaxNodes];  // entries to take this combine, per lane and node
  int32_t got[core::kNetLanes][kMaxNodes];
  int32_t starts[kMaxNodes];  // whether node m's column source sends starts
  int32_t next_start;         // own tokens: the next to consider for a start
  int32_t next_begin[kMaxNodes];
  int32_t puts[core::kNetLanes][kMaxNodes];  // entries this rank puts, per lane and node (announced)
  int32_t agreed[kMaxNodes];                 // node k's column peer announced what this rank expects
  uint64_t home_in[kMaxNodes];  // hierarchical, home: where each node's partial of the token landed
  uint64_t progress;  // when a step last went
  // Whom thread 0 waits for while nothing can go (the deadline names it).
  int32_t wait_peer;
  int64_t wait_expected, wait_observed;
};

__device__ __forceinline__ Published published(const CombineArgs& a, int owner) {
  return published_by(a.xchg, a.xl.off_pub, a.sync.bases, owner);
}

struct Here {
  const CombineArgs& a;
  Chain& c;
  int me, P, N, M, R;
  __device__ int column(int node) const { return core::forwarder(node, me, P); }
  __device__ core::TokenNodes visits(int64_t t) const { return core::TokenNodes{a.h_slot + t * R, P, N}; }
  __device__ bool biased() const { return a.bias0 != nullptr || a.bias1 != nullptr; }
  // The chain: what forwarded token `e` of source node m starts from here (core/internode.h).
  __device__ core::ChainFrom chain_from(int m, const int32_t* e) const {
    return core::chain_from(m, e[ForwardTable::kPrev], M, m != M && c.starts[m] != 0);
  }
  // Whether a token visits a node other than this one.
  __device__ bool away(const core::TokenNodes& v) const {
    for (int k = v.next(-1); k >= 0; k = v.next(k))
      if (k != M) return true;
    return false;
  }

  // Whether the ring of `node`'s column peer has room for one more entry of `lane`.
  // (The signals only grow: what was seen last answers first. On a GPU a read of host-mapped
  // memory crosses PCIe.)
  __device__ bool room(int node, int lane) {
    const uint64_t sent = c.sent[lane][node];
    if (sent < uint64_t(a.net.entries)) return true;
    const uint64_t need = sent + 1 - uint64_t(a.net.entries);
    if (transport::signal_reached(c.credit_seen[lane][node], need)) return true;
    const uint64_t credit = transport::read_signal(a.net.channels[node], column(node), signal_credit(lane));
    c.credit_seen[lane][node] = credit;
    if (transport::signal_reached(credit, need)) return true;
    c.wait_peer = column(node);
    c.wait_expected = int64_t(need);
    c.wait_observed = int64_t(credit);
    return false;
  }
  // Whether the next entry of `lane` from `node` has landed.
  __device__ bool landed(int node, int lane) {
    const uint64_t want = c.taken[lane][node] + 1;
    if (transport::signal_reached(c.landed_seen[lane][node], want)) return true;
    const uint64_t v = transport::read_signal(a.net.channels[node], column(node), signal_landed(lane));
    c.landed_seen[lane][node] = v;
    if (transport::signal_reached(v, want)) return true;
    c.wait_peer = column(node);
    c.wait_expected = int64_t(want);
    c.wait_observed = int64_t(v);
    return false;
  }
  // A landed entry this rank does not expect: refused, naming its sender.
  __device__ Step unexpected(int node, const uint32_t h[4]) {
    peer_value_wrong(a.sync, c.st, kHop, -8, column(node), int32_t(node), int32_t(h[2]), int32_t(h[0]), int32_t(h[1]));
    return Step::Failed;
  }
  // The rows of this node's ranks a step folds in (`slots` null: none); false if a rank's input
  // does not hold one (the ranks passed handles of different dispatches).
  __device__ bool find_rows(const int32_t* slots, int source) {
    for (int q = 0; q < P; ++q) {
      c.rows[q] = -1;
      if (slots == nullptr || slots[q] < 0) continue;
      const int p = M * P + q;
      const int64_t n = core::compact_row([&](int i) { return a.h_prefix[int64_t(i) * R + p]; }, source, slots[q]);
      const int64_t bound = received_bound(c.pub[q]);
      if (n >= bound) {
        FailureInfo f;
        f.kind = KernelFailure::HandleMismatch;
        f.peer = p;
        f.observed = n;
        f.expected = bound;
        net_failed(a.sync, c.st, f, kHop);
        return false;
      }
      c.rows[q] = n;
    }
    return true;
  }
  // A step that goes to (`to`, `lane`) when it has room, or into the output (`to` -1).
  __device__ Step go(Step step, From from, int m, int64_t t, int to, int lane, int32_t* entry) {
    Decision& d = c.d;
    d.step = step;
    d.from = from;
    d.kind = step == Step::Start                        ? core::NetEntry::Start
             : a.hierarchical                           ? core::NetEntry::NodePartial
             : to >= 0 && lane == core::kPassOn         ? core::NetEntry::Partial
                                                        : core::NetEntry::Result;
    d.m = m;
    d.t = int32_t(t);
    d.to = to;
    d.lane = lane;
    d.source = core::forwarder(m, me, P);
    d.entry = entry;
    d.out_off = to >= 0 ? a.net.ring_combine(a.net.off_net_out, to, lane, c.sent[lane][to]) : 0;
    const int32_t* slots = entry != nullptr ? entry + ForwardTable::kSlots : nullptr;
    return find_rows(slots, d.source) ? step : Step::Failed;
  }

  // Thread 0: what each column peer announced it puts here (at its start, before its started
  // flag) is what this rank expects to take. Anything else (an extra or a missing entry, ranks
  // that passed handles of different dispatches) would leave the rings out of step, or wait for
  // ever: refused at once, naming the peer. `all_taken`: Done once every peer agrees (a peer not
  // started yet is waited for, with the deadline); else only the peers started so far are checked.
  __device__ Step announced_agree(bool all_taken) {
    for (int k = 0; k < N; ++k) {
      if (k == M || c.agreed[k]) continue;
      const int p = column(k);
      const uint32_t started = ld_acquire_sys(header_word(a.sync, me, a.net.off_started + 4ull * uint64_t(p)));
      if (!epoch_reached(started, a.sync.epoch)) {
        if (!all_taken) continue;
        c.wait_peer = p;
        c.wait_expected = a.sync.epoch;
        c.wait_observed = started;
        return Step::Idle;
      }
      for (int lane = 0; lane < core::kNetLanes; ++lane) {
        const uint64_t at = a.net.off_announced + 4ull * (uint64_t(lane) * uint64_t(R) + uint64_t(p));
        const int32_t said = int32_t(ld_volatile(header_word(a.sync, me, at)));
        if (said != c.expected[lane][k]) {
          peer_value_wrong(a.sync, c.st, kHop, -10, p, c.expected[lane][k], said, lane);
          return Step::Failed;
        }
      }
      c.agreed[k] = 1;
    }
    return all_taken ? Step::Done : Step::Idle;
  }

  // Block-wide, before anything is put: how many entries this rank puts to each node in each
  // lane (c.puts), announced by thread 0 to the column peer there (announced_agree checks it).
  __device__ void announce_puts() {
    const ForwardTable& f = a.fwd;
    for (int64_t t = threadIdx.x; t < a.tokens && biased() && !a.hierarchical; t += blockDim.x) {  // starts
      if (const int first = core::chain_start_node(visits(t), M, true); first >= 0) {
        atomicAdd(&c.puts[core::kPassOn][first], 1);
      }
    }
    for (int m = 0; m < N; ++m) {
      for (int32_t k = threadIdx.x; k < f.count()[m]; k += blockDim.x) {
        const int next = f.entry(m, f.list(m)[k])[ForwardTable::kNext];
        const core::NetHop to = core::forwarded_departure(m, next, M, a.hierarchical != 0);
        if (to.node >= 0) atomicAdd(&c.puts[to.lane][to.node], 1);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int k = 0; k < N; ++k) {
        if (k == M) continue;
        for (int lane = 0; lane < core::kNetLanes; ++lane) {
          const uint64_t at = a.net.off_announced + 4ull * (uint64_t(lane) * uint64_t(R) + uint64_t(me));
          *header_word(a.sync, column(k), at) = uint32_t(c.puts[lane][k]);
        }
      }
      __threadfence_system();  // before the started flags (net_announce)
    }
  }

  // Thread 0: the first step that can go now, Done, Failed, or Idle.
  __device__ Step decide() {
    c.d.node_in = -1;
    c.d.in_off = 0;  // no entry taken (work() forms its address whatever the step)
    return a.hierarchical ? decide_hierarchical() : decide_chain();
  }

  // The hierarchical reduction: this node's part of every token of another node's source in
  // this rank's column, from zero and rounded, home; and at home, each own token once the parts
  // of all its other nodes have landed (each node sends them in token order, so they are the
  // heads of its ring).
  __device__ Step decide_hierarchical() {
    const ForwardTable& f = a.fwd;
    for (int m = 0; m < N; ++m) {
      if (m == M) continue;
      if (c.next_begin[m] < f.count()[m] && room(m, core::kKeep)) {
        const int32_t t = f.list(m)[c.next_begin[m]];
        const core::NetHop to = core::forwarded_departure(m, -1, M, true);
        return go(Step::Begin, From::Zero, m, t, to.node, to.lane, f.entry(m, t));
      }
    }
    // Own tokens that stay on this node are the grid's (normal_combine.cu).
    while (c.next_start < a.tokens && !away(visits(c.next_start))) ++c.next_start;
    if (c.next_start < a.tokens) {
      const int64_t t = c.next_start;
      const core::TokenNodes v = visits(t);
      bool ready = true;
      for (int k = v.next(-1); k >= 0 && ready; k = v.next(k)) {
        if (k == M) continue;
        ready = c.got[core::kKeep][k] < c.expected[core::kKeep][k] && landed(k, core::kKeep);
        if (!ready) break;
        const uint64_t in = a.net.ring_combine(a.net.off_net_in, k, core::kKeep, c.taken[core::kKeep][k]);
        const int4 raw = __ldcg(reinterpret_cast<const int4*>(a.net.net_base + in));
        const uint32_t h[4] = {uint32_t(raw.x), uint32_t(raw.y), uint32_t(raw.z), uint32_t(raw.w)};
        if (h[0] != uint32_t(core::NetEntry::NodePartial) || int(h[1]) != M || int32_t(h[2]) != int32_t(t)) {
          return unexpected(k, h);
        }
        c.home_in[k] = in;
      }
      if (ready) return go(Step::Home, From::Biases, M, t, -1, core::kKeep, v.at(M) ? f.entry(M, t) : nullptr);
    }
    bool done = c.next_start >= a.tokens;
    for (int m = 0; m < N; ++m) done = done && (m == M || c.next_begin[m] >= f.count()[m]);
    for (int k = 0; k < N; ++k) done = done && c.got[core::kKeep][k] >= c.expected[core::kKeep][k];
    return done ? announced_agree(true) : Step::Idle;
  }

  // The chain.
  __device__ Step decide_chain() {
    const ForwardTable& f = a.fwd;
    // Starts of own tokens whose first node is another.
    for (; c.next_start < a.tokens; ++c.next_start) {
      const int first = core::chain_start_node(visits(c.next_start), M, biased());
      if (first < 0) continue;
      if (!room(first, core::kPassOn)) break;
      return go(Step::Start, From::Biases, M, c.next_start, first, core::kPassOn, nullptr);
    }
    // Tokens whose way begins here without anything from the network.
    for (int m = 0; m < N; ++m) {
      for (; c.next_begin[m] < f.count()[m]; ++c.next_begin[m]) {
        const int32_t t = f.list(m)[c.next_begin[m]];
        int32_t* e = f.entry(m, t);
        const core::ChainFrom from = chain_from(m, e);
        const core::NetHop to = core::chain_onward(m, e[ForwardTable::kNext], M);
        // Only what starts here; an own token that stays on this node is the grid's
        // (normal_combine.cu).
        if (from == core::ChainFrom::Partial || from == core::ChainFrom::Start || to.node < 0) continue;
        if (!room(to.node, to.lane)) break;
        return go(Step::Begin, from == core::ChainFrom::Biases ? From::Biases : From::Zero, m, t, to.node, to.lane, e);
      }
    }
    for (int k = 0; k < N; ++k) {
      if (k == M) continue;
      // Starts and partials from node k, in the order they came.
      if (c.got[core::kPassOn][k] < c.expected[core::kPassOn][k] && landed(k, core::kPassOn)) {
        const uint64_t in = a.net.ring_combine(a.net.off_net_in, k, core::kPassOn, c.taken[core::kPassOn][k]);
        uint32_t h[4];
        const int4 raw = __ldcg(reinterpret_cast<const int4*>(a.net.net_base + in));
        h[0] = uint32_t(raw.x), h[1] = uint32_t(raw.y), h[2] = uint32_t(raw.z), h[3] = uint32_t(raw.w);
        const int m = int(h[1]);
        int32_t* e = const_cast<int32_t*>(f.find(m, int32_t(h[2])));
        const bool from_there = e != nullptr && core::chain_accepts(chain_from(m, e), h[0], m, e[ForwardTable::kPrev], k);
        if (!from_there || e[ForwardTable::kDone] == int32_t(a.sync.epoch)) return unexpected(k, h);
        const core::NetHop to = core::chain_onward(m, e[ForwardTable::kNext], M);
        if (to.node < 0 || room(to.node, to.lane)) {
          c.d.node_in = k;
          c.d.in_off = in;
          return go(Step::PassOn, From::Entry, m, h[2], to.node, to.lane, e);
        }
      }
      // Results of this rank's own tokens from node k.
      if (c.got[core::kKeep][k] < c.expected[core::kKeep][k] && landed(k, core::kKeep)) {
        const uint64_t in = a.net.ring_combine(a.net.off_net_in, k, core::kKeep, c.taken[core::kKeep][k]);
        const int4 raw = __ldcg(reinterpret_cast<const int4*>(a.net.net_base + in));
        const uint32_t h[4] = {uint32_t(raw.x), uint32_t(raw.y), uint32_t(raw.z), uint32_t(raw.w)};
        const int64_t t = int32_t(h[2]);
        if (h[0] != uint32_t(core::NetEntry::Result) || int(h[1]) != M || t < 0 || t >= a.tokens ||
            core::chain_result_node(visits(t), M) != k || f.stored()[t] == int32_t(a.sync.epoch)) {
          return unexpected(k, h);
        }
        c.d.node_in = k;
        c.d.in_off = in;
        return go(Step::Keep, From::Entry, M, t, -1, core::kKeep, nullptr);
      }
    }
    bool done = c.next_start >= a.tokens;
    for (int m = 0; m < N; ++m) done = done && c.next_begin[m] >= f.count()[m];
    for (int k = 0; k < N; ++k)
      for (int lane = 0; lane < core::kNetLanes; ++lane) done = done && c.got[lane][k] >= c.expected[lane][k];
    return done ? announced_agree(true) : Step::Idle;
  }

  // Thread 0: decides, polling until a step can go, the deadline passes or a peer aborts.
  __device__ void next_step() {
    for (uint32_t spins = 0;; ++spins) {
      Step s = decide();
      // Nothing staged or owed may wait while this rank waits, or at its end: a peer may need it.
      if ((s == Step::Idle || s == Step::Done) && !ld_volatile(&c.st.failed) && !flush()) s = Step::Failed;
      if (s == Step::Idle && net_stopped(a.sync, c.st, spins, kHop, a.net.channels, 2 * N)) s = Step::Failed;
      // Waiting: a peer that announced other counts will not send what is waited for.
      if (s == Step::Idle && (spins & 63u) == 0) s = announced_agree(false) == Step::Failed ? Step::Failed : s;
      if (s == Step::Idle && (spins & 63u) == 63u) {
        if (const uint64_t waited = global_ns() - c.progress; waited > a.sync.timeout_ns) {
          net_timed_out(a.sync, c.st, late_network_hop(a.net, kHop), c.wait_peer, kHop, c.wait_expected,
                        c.wait_observed, waited);
          s = Step::Failed;
        }
      }
      if (s != Step::Idle) {
        c.d.step = ld_volatile(&c.st.failed) ? Step::Failed : s;
        return;
      }
      __nanosleep(256);
    }
  }

  // The block: the step's channels and top-k weights, folded and written where they go.
  __device__ void work() {
    const Decision& d = c.d;
    const uint8_t* in = a.net.net_base + d.in_off;
    uint8_t* out = d.to >= 0 ? a.net.net_base + d.out_off : nullptr;
    const bool partial = d.to >= 0 && d.lane == core::kPassOn;
    const NetworkArgs& n = a.net;
    const int groups = a.hidden / 8;
    if (d.step == Step::Keep) {  // a result: BF16 channels and weights, as they are
      const uint8_t* row = in + n.net_payload;
      for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        store_raw16(a.out + d.t * a.out_stride + g * 16, __ldcg(reinterpret_cast<const int4*>(row + n.row_payload) + g));
      }
      for (int k = threadIdx.x; k < a.topk && a.out_w != nullptr; k += blockDim.x) {
        a.out_w[int64_t(d.t) * a.topk + k] = __ldcg(reinterpret_cast<const float*>(row + n.row_topk_weights) + k);
      }
      return;
    }
    if (d.step == Step::Home) {
      home();
      return;
    }
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      float v[8];
      if (d.from == From::Entry) {
        const auto* p = reinterpret_cast<const float4*>(in + n.net_payload) + 2 * g;
        const float4 lo = __ldcg(p), hi = __ldcg(p + 1);
        acc[0] = lo.x, acc[1] = lo.y, acc[2] = lo.z, acc[3] = lo.w, acc[4] = hi.x, acc[5] = hi.y, acc[6] = hi.z,
        acc[7] = hi.w;
      } else if (d.from == From::Biases) {  // 0 + bias0 + bias1, the contract's start
        const auto add = [&](const uint8_t* bias, int64_t stride) {
          if (bias == nullptr) return;
          load_bf16x8(bias + int64_t(d.t) * stride + g * 16, v);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] += v[i];
        };
        add(a.bias0, a.bias0_stride);
        add(a.bias1, a.bias1_stride);
      }
      for (int q = 0; q < P; ++q) {  // this node's ranks, ascending
        if (c.rows[q] < 0) continue;
        contribution(c.pub[q], c.rows[q], g, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += v[i];
      }
      if (partial) {
        auto* p = reinterpret_cast<float4*>(out + n.net_payload) + 2 * g;
        float4 lo, hi;
        lo.x = acc[0], lo.y = acc[1], lo.z = acc[2], lo.w = acc[3];
        hi.x = acc[4], hi.y = acc[5], hi.z = acc[6], hi.w = acc[7];
        p[0] = lo;
        p[1] = hi;
      } else if (out != nullptr) {
        store_bf16x8(out + n.net_payload + n.row_payload + g * 16, acc);
      } else {
        store_bf16x8(a.out + d.t * a.out_stride + g * 16, acc);
      }
    }
    for (int k = threadIdx.x; k < core::kMaxTopk; k += blockDim.x) {
      float sum = 0.0f;
      if (k < a.topk) {
        if (d.from == From::Entry) sum = __ldcg(reinterpret_cast<const float*>(in + n.net_payload + n.net_partial_weights) + k);
        for (int q = 0; q < P; ++q)
          if (c.rows[q] >= 0) add_contribution_weight(c.pub[q], c.rows[q], k, sum);
      }
      if (partial) {
        reinterpret_cast<float*>(out + n.net_payload + n.net_partial_weights)[k] = sum;
      } else if (k < a.topk) {
        if (out != nullptr) {
          reinterpret_cast<float*>(out + n.net_payload + n.row_topk_weights)[k] = sum;
        } else if (a.out_w != nullptr) {
          a.out_w[int64_t(d.t) * a.topk + k] = sum;
        }
      }
    }
    if (threadIdx.x == 0 && out != nullptr) {
      auto* h = reinterpret_cast<uint32_t*>(out);
      h[0] = uint32_t(d.kind);
      h[1] = uint32_t(d.m);
      h[2] = uint32_t(d.t);
      h[3] = 0;
    }
  }

  // Hierarchical, home: the biases, then each node's part in node order (this node's folded from
  // zero and rounded here, the others' as they landed), rounded again.
  __device__ void home() {
    const Decision& d = c.d;
    const NetworkArgs& n = a.net;
    const core::TokenNodes v = visits(d.t);
    for (int g = threadIdx.x; g < a.hidden / 8; g += blockDim.x) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      float v8[8];
      const auto add = [&](const uint8_t* bias, int64_t stride) {
        if (bias == nullptr) return;
        load_bf16x8(bias + int64_t(d.t) * stride + g * 16, v8);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += v8[i];
      };
      add(a.bias0, a.bias0_stride);
      add(a.bias1, a.bias1_stride);
      for (int k = v.next(-1); k >= 0; k = v.next(k)) {
        if (k == M) {
          float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          for (int q = 0; q < P; ++q) {
            if (c.rows[q] < 0) continue;
            contribution(c.pub[q], c.rows[q], g, v8);
#pragma unroll
            for (int i = 0; i < 8; ++i) part[i] += v8[i];
          }
#pragma unroll
          for (int i = 0; i < 8; ++i) v8[i] = core::bf16_to_float(core::float_to_bf16(part[i]));
        } else {
          unpack_bf16x8(__ldcg(reinterpret_cast<const int4*>(a.net.net_base + c.home_in[k] + n.net_payload +
                                                             n.row_payload) + g),
                        v8);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += v8[i];
      }
      store_bf16x8(a.out + d.t * a.out_stride + g * 16, acc);
    }
    for (int k = threadIdx.x; k < a.topk && a.out_w != nullptr; k += blockDim.x) {
      float sum = 0.0f;
      for (int node = v.next(-1); node >= 0; node = v.next(node)) {
        if (node == M) {
          float part = 0.0f;
          for (int q = 0; q < P; ++q)
            if (c.rows[q] >= 0) add_contribution_weight(c.pub[q], c.rows[q], k, part);
          sum += part;
        } else {
          sum += __ldcg(reinterpret_cast<const float*>(a.net.net_base + c.home_in[node] + n.net_payload +
                                                       n.row_topk_weights) + k);
        }
      }
      a.out_w[int64_t(d.t) * a.topk + k] = sum;
    }
  }

  // Thread 0: the staged run of `lane` to `node`, put as one put whose landed signal grows by its
  // length (false if the put failed: recorded).
  __device__ bool put_run(int lane, int node) {
    const NetworkArgs& n = a.net;
    const uint64_t from = c.posted[lane][node], k = c.sent[lane][node] - from;
    if (k == 0) return true;
    const transport::TransportStatus put = transport::put_signal(
        n.channels[node], column(node), n.ring_combine(n.off_net_out, node, lane, from),
        n.ring_combine(n.off_net_in, M, lane, from), k * n.combine_entry_bytes(lane), signal_landed(lane), k);
    if (!put.ok()) {
      transport_failed(a.sync, c.st, kHop, column(node), put, a.net.channels, 2 * N);
      return false;
    }
    c.posted[lane][node] = c.sent[lane][node];
    return true;
  }
  // Thread 0: the credits owed to `node`'s column peer for `lane`, as one signal.
  __device__ bool pay(int lane, int node) {
    const int32_t k = c.owed[lane][node];
    if (k == 0) return true;
    const transport::TransportStatus credit =
        transport::signal(a.net.channels[N + node], column(node), signal_credit(lane), uint64_t(k));
    if (!credit.ok()) {
      transport_failed(a.sync, c.st, kHop, column(node), credit, a.net.channels, 2 * N);
      return false;
    }
    c.owed[lane][node] = 0;
    return true;
  }
  // Thread 0: every staged run and owed credit, before this rank waits or ends.
  __device__ bool flush() {
    for (int k = 0; k < N; ++k)
      for (int lane = 0; lane < core::kNetLanes; ++lane)
        if (k != M && !(put_run(lane, k) && pay(lane, k))) return false;
    return true;
  }
  // Thread 0: an entry taken from `node`'s `lane`, its credit owed.
  __device__ bool took(int lane, int node) {
    c.taken[lane][node] += 1;
    c.got[lane][node] += 1;
    c.owed[lane][node] += 1;
    // Paid once a run's worth is owed, or the last entry this combine expects from there is taken.
    const bool due = uint64_t(c.owed[lane][node]) >= put_run_limit(uint64_t(a.net.entries)) ||
                     c.got[lane][node] >= c.expected[lane][node];
    return !due || pay(lane, node);
  }

  // Thread 0, after the block's work: the entry staged (its run put once full or at the ring's
  // end), the credits owed, and the books. Runs and credits go in batches, as in dispatch: a put
  // per entry would cost a proxy descriptor each (flush() sends what is left before any wait).
  __device__ void commit() {
    const Decision& d = c.d;
    if (d.to >= 0) {
      const uint64_t sent = ++c.sent[d.lane][d.to], entries = uint64_t(a.net.entries);
      // A run goes once full, at the ring's end, or with the last entry this combine puts there.
      const bool full = sent - c.posted[d.lane][d.to] >= put_run_limit(entries) || sent % entries == 0 ||
                        sent - c.first_sent[d.lane][d.to] >= uint64_t(c.puts[d.lane][d.to]);
      if (full && !put_run(d.lane, d.to)) return;
    }
    if (d.node_in >= 0 && !took(d.step == Step::Keep ? core::kKeep : core::kPassOn, d.node_in)) return;
    if (d.step == Step::Home) {  // a credit to every node whose part it took
      const core::TokenNodes v = visits(d.t);
      for (int k = v.next(-1); k >= 0; k = v.next(k))
        if (k != M && !took(core::kKeep, k)) return;
    }
    switch (d.step) {
      case Step::Start:
      case Step::Home: ++c.next_start; break;
      case Step::Begin: ++c.next_begin[d.m]; break;
      case Step::Keep: a.fwd.stored()[d.t] = int32_t(a.sync.epoch); break;
      default: break;
    }
    if (d.entry != nullptr) d.entry[ForwardTable::kDone] = int32_t(a.sync.epoch);
    c.progress = global_ns();
  }
};

__global__ void __launch_bounds__(kSyncThreads) combine_network_kernel(CombineArgs a) {
  SY_SHARED(Chain, c);
  SY_SHARED(int, run);
  const NetworkArgs& n = a.net;
  const int me = a.sync.rank, P = n.ranks_per_node, N = n.nodes;
  Here h{a, c, me, P, N, core::node_of(me, P), a.sync.ranks};
  if (threadIdx.x == 0) {
    net_begin(c.st, kHop);
    run = !op_failed(a.sync.report) && *a.ws.passed_barrier == 1 ? 1 : 0;
    if (run && *n.broken != 0) {
      peer_value_wrong(a.sync, c.st, kHop, -3, -1, 0, 0);
      run = 0;
    }
    for (int k = 0; k < N; ++k) {
      for (int lane = 0; lane < core::kNetLanes; ++lane) {
        c.sent[lane][k] = n.sent_to(k, lane);
        c.taken[lane][k] = n.taken_from(k, lane);
        c.posted[lane][k] = c.sent[lane][k];
        c.first_sent[lane][k] = c.sent[lane][k];
        c.owed[lane][k] = 0;
        // Lower bounds of the signals: the credit for what was sent a ring before, what was taken.
        c.credit_seen[lane][k] = c.sent[lane][k] > uint64_t(n.entries) ? c.sent[lane][k] - uint64_t(n.entries) : 0;
        c.landed_seen[lane][k] = c.taken[lane][k];
        c.expected[lane][k] = 0;
        c.got[lane][k] = 0;
      }
      c.starts[k] = k != h.M && published(a, h.column(k)).chain_starts != 0 ? 1 : 0;
      c.next_begin[k] = 0;
      c.agreed[k] = 0;
      for (int lane = 0; lane < core::kNetLanes; ++lane) c.puts[lane][k] = 0;
    }
    c.next_start = 0;
    c.progress = global_ns();
    c.wait_peer = -1;
    c.wait_expected = c.wait_observed = 0;
  }
  __syncthreads();
  if (!run) {
    net_end(a.sync, c.st, n.broken);
    return;
  }
  for (int q = threadIdx.x; q < P; q += blockDim.x) c.pub[q] = published(a, h.M * P + q);
  h.announce_puts();
  __syncthreads();
  net_announce(a.sync, n.off_started);
  // What comes from each node: results of own tokens whose last node is another (lane 1); starts
  // and partials of the tokens forwarded here (lane 0).
  const auto expect = [&](int node, int lane) { atomicAdd(&c.expected[lane][node], 1); };
  for (int64_t t = threadIdx.x; t < a.tokens; t += blockDim.x)
    core::own_token_arrivals(h.visits(t), h.M, a.hierarchical != 0, expect);
  for (int m = 0; m < N; ++m) {
    for (int32_t k = threadIdx.x; k < a.fwd.count()[m]; k += blockDim.x) {
      const int prev = a.fwd.entry(m, a.fwd.list(m)[k])[ForwardTable::kPrev];
      core::forwarded_arrival(m, prev, h.M, m != h.M && c.starts[m] != 0, a.hierarchical != 0, expect);
    }
  }
  __syncthreads();
  for (;;) {
    if (threadIdx.x == 0) h.next_step();
    __syncthreads();
    const Step step = c.d.step;
    if (step == Step::Done || step == Step::Failed) break;
    h.work();
    __syncthreads();
    if (threadIdx.x == 0) h.commit();
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int k = 0; k < N; ++k) {
      for (int lane = 0; lane < core::kNetLanes; ++lane) {
        n.sent_to(k, lane) = c.sent[lane][k];
        n.taken_from(k, lane) = c.taken[lane][k];
      }
    }
  }
  net_end(a.sync, c.st, n.broken);
}

}  // namespace

cudaError_t launch_combine_network(const CombineArgs& a, cudaStream_t stream) {
  SY_LAUNCH(combine_network_kernel, 1, kSyncThreads, 0, stream)(a);
  return cudaGetLastError();
}

}  // namespace sy::cuda
