// Normal-mode dispatch and combine on the CUDA backend, for ranks whose memory is directly
// addressable from each other's kernels: virtual ranks of one process (on one GPU or on
// peer-accessible GPUs), and ranks in processes of their own, whose buffers are mapped into
// each other's address space by CUDA IPC.
//
// The design moves every payload byte once: read from where it lives, written to where it
// ends. Each rank publishes, before the start-of-operation barrier, what its peers need to pull
// from it: the addresses and strides of its inputs and, per destination, the list of tokens it
// sends there in order (an "exchange page" of its own device memory). After the barrier every
// rank knows all counts, so it computes its received rows by itself and pulls each row straight
// from the sender's input into its own output (dispatch), or pulls each token's expert outputs
// from every rank that holds one and reduces them in registers (combine). No staging copy (between
// virtual ranks; processes stage, below), no
// second pass, no data-dependent spin inside the copy kernels: only two one-block kernels wait
// for peers (the barrier, and the end, where a rank waits until every peer has finished reading
// its inputs so that the caller may overwrite them).
//
// A rank in a process of its own cannot address its peers' inputs, only their buffers: there
// each operation first stages its inputs into its own buffer (SharedLayout), and publishes the
// staged copy instead. Published addresses are in the publisher's address space; a reader
// shifts them by the difference between its view of the publisher's buffer and the publisher's
// own (`published`), which for virtual ranks is none.
//
// Kernel sequence of a dispatch on rank r, all on r's communication stream:
//   route       top-k check, token-in-rank rows, tokens per (destination, local expert)
//   rank        the slot of each token towards each destination, the per-destination send lists
//   exchange    publish; barrier (kind, parameters, rejection); counts, prefix matrix, expert
//               groups; the counts go to mapped host memory for exact-size mode
//   (host)      exact-size mode sizes the outputs
//   receive     pull every received row (compact), or gather, rank by local expert and pull
//               into the expanded rows
//   finish      tell every source we are done reading; wait until every peer is done with ours
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../core/plan.h"
#include "device_sync.cuh"
#include "transport/net_channel.cuh"

namespace sy::cuda {

// What an operation lets its peers read, published in the owner's exchange page. Strides are
// in bytes.
struct Published {
  // dispatch inputs
  const uint8_t* x;
  int64_t x_stride;
  const uint8_t* scales;
  int64_t scale_st, scale_ss;
  const uint8_t* topk_idx;
  int64_t idx_st, idx_sk;
  int32_t idx_i64, reserved0;
  const uint8_t* topk_w;
  int64_t w_st, w_sk;
  int64_t tokens;  // rows of x: a peer never reads past them, whatever its handle says
  // combine inputs
  const uint8_t* cx;
  int64_t cx_stride;
  const uint8_t* cw;
  int64_t cw_st, cw_sk;
  const int32_t* expanded_row;  // the dispatch handle's [received tokens][k] rows (expanded)
  int32_t expanded_k;
  int32_t chain_starts;  // two-hop combine: 1 when the publisher's tokens start from biases it sends
  int64_t c_rows;    // rows of cx
  int64_t c_tokens;  // received tokens of the handle (rows of expanded_row)
  const uint8_t* origin;  // where the publisher sees its own buffer: readers shift the addresses above
};

// The exchange page of one rank, identical for every rank of a buffer set.
struct ExchangeLayout {
  uint64_t off_pub = 0;
  uint64_t off_send_counts = 0;  // i32[R]: tokens this rank sends to each rank
  uint64_t off_expert_send = 0;  // i32[R][EL]: of those, per local expert of the destination
  uint64_t off_send_list = 0;    // i32[R][max_tokens]: the tokens sent to each rank, in order
  uint64_t off_node_send = 0;    // i32[nodes]: tokens this rank sends to each node (two hops)
  uint64_t bytes = 0;
};

ExchangeLayout exchange_layout(int ranks, int max_tokens, int nodes);

// A rank's shared buffer on the CUDA backend: the header of every backend (core/plan.h), its
// exchange page, and, when its peers live in other processes, the staging areas they pull from.
//   [0, header_bytes)   core::BufferPlan's header
//   off_xchg            the exchange page (xl)
//   off_records         max_tokens_per_rank token records (core::BufferPlan's record format):
//                       this rank's dispatch inputs, token t in record t
//   off_rows            max_recv_rows combine rows (core::BufferPlan's row format): its combine
//                       inputs, received token n in row n (expanded: its rows summed, in BF16)
// and, when the ranks span nodes and dispatch takes two hops (normal_network.cu):
//   off_relay           the records of the sources on other nodes, as their forwarders deliver
//                       them: source s's token in slot j at record relay_index(s) * max_tokens + j
//   off_net_in          per sender node and lane (core::kNetLanes), a ring of net_ring_entries
//                       network entries (core::BufferPlan::net_entry_bytes; a dispatch packs its
//                       records at their own size: ring_record): what this rank forwards, passes
//                       on or keeps (core/internode.h)
//   off_net_out         per destination node and lane, a ring of as many: the entries this rank
//                       puts, staged in its window (the NIC reads them from there)
struct SharedLayout {
  ExchangeLayout xl;
  uint64_t off_xchg = 0;
  bool staged = false;
  uint64_t off_records = 0;
  uint64_t off_rows = 0;
  bool two_hop = false;
  uint64_t off_relay = 0;
  uint64_t off_net_in = 0;
  uint64_t off_net_out = 0;
  uint64_t bytes = 0;
};

// Where the relay region keeps the records of source `s` at a rank of node `node`: the sources
// of the other nodes, in rank order.
__host__ __device__ __forceinline__ int relay_index(int s, int node, int ranks_per_node) {
  return s < node * ranks_per_node ? s : s - ranks_per_node;
}

SharedLayout shared_layout(const core::BufferPlan& plan, bool staged);

// Where an operation stages its inputs (process groups), in the plan's record or row format;
// base is null for virtual ranks, which publish their inputs where they are.
struct Staging {
  uint8_t* base = nullptr;
  int64_t stride = 0;  // bytes per record or row
  int32_t payload = 0, scales = 0, topk_idx = 0, topk_weights = 0;  // offsets in a record or row
  int64_t rows = 0;    // combine: rows staged
};

// Private per-buffer device scratch of one rank.
struct Workspace {
  int32_t* recv_start = nullptr;    // [R] first received row from each source
  int32_t* recv_cnt = nullptr;      // [R] rows from each source
  int32_t* expert_count = nullptr;  // [kMaxExpertsPerRank] received per local expert
  int64_t* group_base = nullptr;    // [kMaxExpertsPerRank] first expanded row per local expert
  int64_t* pad_prefix = nullptr;    // [kMaxExpertsPerRank + 1] padding rows of the groups before each
  int64_t* totals = nullptr;        // [0] tokens received, [1] output rows used
  int32_t* passed_barrier = nullptr;  // [1] 1 once this operation's barrier succeeded
  int32_t* rank_counts = nullptr;   // ordered-ranking chunk table
  int32_t* rank_totals = nullptr;   // [max(R, kMaxExpertsPerRank)]
  int32_t* recv_local = nullptr;    // [capacity][K] local expert of each received entry, or -1
  uint32_t* recv_mask = nullptr;    // [capacity][ceil(EL / 32)] bit l: the entry's token has local expert l
};

// What a forwarder keeps of a two-hop dispatch for the combine of the same handle (the handle's
// device memory; the dispatch's network kernel writes it, the combine's reads it), per source node
// m, the tokens of m's source in this rank's column that visit this rank's node (its own node:
// this rank's own tokens that visit it):
//   count[N]            how many
//   list[N][T]          which, in token order
//   entry[N][T][F]      by token: its index in the list, the node before and after this one on
//                       its way (-1: none), the combine that passed it on (its epoch), and its slot
//                       at each rank of this node
//   stored[T]           this rank's own tokens: the combine that stored its result
// A token's entry is the handle's when its index leads back to it through the list (what arrives
// from the network names a token; anything else is refused).
struct ForwardTable {
  static constexpr int kIndex = 0, kPrev = 1, kNext = 2, kDone = 3, kSlots = 4;
  int32_t* base = nullptr;
  int32_t nodes = 0, tokens = 0, ranks_per_node = 0;

  __host__ __device__ static uint64_t words(int nodes, int tokens, int ranks_per_node) {
    return uint64_t(nodes) * (1 + uint64_t(tokens) * (1 + uint64_t(kSlots + ranks_per_node))) + uint64_t(tokens);
  }
  __host__ __device__ int32_t* count() const { return base; }
  __host__ __device__ int32_t* list(int m) const { return base + nodes + int64_t(m) * tokens; }
  __host__ __device__ int32_t* entry(int m, int64_t t) const {
    return base + nodes + int64_t(nodes) * tokens + (int64_t(m) * tokens + t) * (kSlots + ranks_per_node);
  }
  __host__ __device__ int32_t* stored() const {
    return base + nodes + int64_t(nodes) * tokens * (1 + kSlots + ranks_per_node);
  }
  // Token t's entry from source node m, if this handle's dispatch forwarded it here; else null.
  __device__ const int32_t* find(int m, int64_t t) const {
    if (m < 0 || m >= nodes || t < 0 || t >= tokens) return nullptr;
    const int32_t* e = entry(m, t);
    const int32_t k = e[kIndex];
    return k >= 0 && k < count()[m] && list(m)[k] == int32_t(t) ? e : nullptr;
  }
};

// The two hops across nodes on this backend (normal_network.cu, combine_network.cu,
// core/internode.h).
struct NetworkArgs {
  int32_t ranks_per_node = 0, nodes = 1;
  uint8_t* relay = nullptr;  // this rank's relay region; null: one hop
  uint64_t off_relay = 0, off_net_in = 0, off_net_out = 0;
  // Where this rank addresses its network regions (off_net_in, off_net_out): net_base + offset.
  // Its buffer, or, with NCCL GIN, the window registered for them (their own allocation, which
  // starts at off_net_in).
  uint8_t* net_base = nullptr;
  int32_t entries = 0, entry_bytes = 0;  // of each lane's ring (core::BufferPlan::net_entry_bytes)
  // The plan's record format, and the network record's fields after it (core/plan.h).
  int32_t record_bytes = 0, rec_payload = 0, rec_scales = 0, rec_topk_idx = 0, rec_topk_weights = 0, rec_src_idx = 0;
  int32_t net_record_bytes = 0, net_slots = 0, net_chain_next = 0, net_chain_prev = 0;
  // The combine entries (core/plan.h) and the combine row a result carries.
  int32_t net_payload = 0, net_partial_weights = 0, net_partial_bytes = 0, net_result_bytes = 0;
  int32_t row_payload = 0, row_topk_weights = 0;
  uint64_t off_forward_epoch = 0, off_forwarded = 0;
  uint64_t off_started = 0;  // u32[R]: rank p started the network kernel of operation n (network_state.cuh)
  uint64_t off_announced = 0;  // u32[lanes][R]: combine: the entries rank p puts here (combine_network.cu)
  // Device memory: this rank's network channels, [nodes] to send to each node, then [nodes] to
  // credit each node's sender; the network counters that persist across operations, per lane
  // and node (entries put to each node's column peer, taken from each node's); 1 once a failure
  // left them wrong.
  const transport::NetChannel* channels = nullptr;
  uint64_t* sent = nullptr;
  uint64_t* taken = nullptr;
  int32_t* broken = nullptr;

  // Where the ring of `lane` from (in) or to (out) `node` starts in a rank's window: each is
  // `entries` slots of the plan's largest entry (core::net_ring_slot).
  __host__ __device__ uint64_t ring_base(uint64_t ring, int node, int lane) const {
    return ring + core::net_ring_slot(node, lane, 0, entries, entry_bytes);
  }
  // Where dispatch record `index` from (in) or to (out) `node` lies: in lane 0's ring, packed at
  // the record's size, so that a put of consecutive records carries no gaps. Combine entries are
  // packed at their own sizes (ring_combine). Dispatch and combine count lane 0's entries on
  // together but place index i at different bytes: that is safe because every operation ends with
  // its rings empty (each receiver has taken every entry it was sent), so no slot is in use across
  // an operation's boundary.
  __host__ __device__ uint64_t ring_record(uint64_t ring, int node, uint64_t index) const {
    return ring_packed(ring, node, core::kPassOn, index, uint64_t(net_record_bytes));
  }
  // A combine entry's size in `lane`: starts and partials in lane 0, results and node parts in 1.
  __host__ __device__ uint64_t combine_entry_bytes(int lane) const {
    return uint64_t(lane == core::kPassOn ? net_partial_bytes : net_result_bytes);
  }
  // Where combine entry `index` of `lane` from (in) or to (out) `node` lies, packed at the lane's
  // entry size, so that a put of consecutive entries carries no gaps.
  __host__ __device__ uint64_t ring_combine(uint64_t ring, int node, int lane, uint64_t index) const {
    return ring_packed(ring, node, lane, index, combine_entry_bytes(lane));
  }
  // Entry `index` of a ring whose entries are packed at `bytes` each (a ring's slots are of the
  // plan's largest entry, so any smaller size fits).
  __host__ __device__ uint64_t ring_packed(uint64_t ring, int node, int lane, uint64_t index, uint64_t bytes) const {
    return ring_base(ring, node, lane) + index % uint64_t(entries) * bytes;
  }
  __host__ __device__ uint64_t& sent_to(int node, int lane) const { return sent[lane * nodes + node]; }
  __host__ __device__ uint64_t& taken_from(int node, int lane) const { return taken[lane * nodes + node]; }
};

// Entries one put of the two hops carries at most (a run of consecutive entries for one ring): 16,
// DeepEP's chunk, from rings of 32 entries or more, so that one run is in flight while the next is
// staged; smaller rings half of theirs. Runs never pass a ring's end (a put is contiguous).
__host__ __device__ inline uint64_t put_run_limit(uint64_t entries) { return entries >= 32 ? 16 : (entries + 1) / 2; }

// The end handshake of a two-hop operation names a rank that never started its network hop
// (device_sync.cuh); one hop: nothing to name.
__host__ __device__ inline LateHop late_network_hop(const NetworkArgs& n, core::WaitRole role) {
  LateHop h;
  if (n.relay != nullptr) {
    h.off_started = n.off_started;
    h.role = role;
    h.ranks_per_node = n.ranks_per_node;
  }
  return h;
}

// Signal slots of the network rings, per lane (core::kNetLanes): the entries that landed in a
// receiver's ring from a sender, and the entries the receiver has taken (the sender's credit).
__host__ __device__ constexpr int signal_landed(int lane) { return lane; }
__host__ __device__ constexpr int signal_credit(int lane) { return core::kNetLanes + lane; }
inline constexpr int kNetworkSignals = 2 * core::kNetLanes;
// The channel every sender raises signal `slot` of a rank of node `node` on: entries land through
// the senders' channel to that node (channels[node]), credits come through their channel that
// credits it (channels[nodes + node]). NCCL GIN reads a signal in the context that raised it
// (gin_channel.cuh); the proxy checks every signal against this (ProxyOptions::signal_channels).
__host__ __device__ constexpr int signal_channel(int slot, int node, int nodes) {
  return slot < core::kNetLanes ? node : nodes + node;
}
// The nodes a two-hop operation may span: the dispatch's network kernel gives each node a sending
// and a forwarding warp in one block of kSyncThreads.
inline constexpr int kMaxNodes = 8;

struct DispatchArgs {
  SyncArgs sync;
  uint8_t* const* xchg = nullptr;  // device array: every rank's exchange page
  uint8_t* own_xchg = nullptr;     // this rank's page (the host knows it)
  ExchangeLayout xl;
  uint64_t off_done = 0;
  uint32_t desc[core::kDescWords] = {};
  Published pub{};         // this rank's inputs, where they are
  Published shared_pub{};  // what the peers read: `pub`, or the staged copy
  Staging stage;
  int64_t tokens = 0;
  int32_t max_tokens = 0, topk = 0, experts = 0, local_experts = 0;
  int32_t cached = 0, layout = 0, alignment = 1, zero_padding = 0;
  int32_t payload_bytes = 0, num_scales = 0;
  // Routing given as a token-in-rank matrix instead of top-k.
  const uint8_t* user_route = nullptr;
  int64_t route_st = 0, route_sr = 0;
  // The handle.
  uint8_t* h_route = nullptr;     // [T][R] bool
  int32_t* h_slot = nullptr;      // [T][R]
  int32_t* h_prefix = nullptr;    // [R][R]
  int32_t* h_src_idx = nullptr;   // [cap]
  int32_t* h_src_rank = nullptr;  // [cap]
  int32_t* h_exp_row = nullptr;   // [cap][K] (expanded)
  int32_t* h_state = nullptr;     // [1] 1 complete, 2 failed
  int32_t h_topk = 0;
  int64_t h_cap = 0, cached_tokens = 0, cached_rows = 0;
  // Outputs, dense.
  uint8_t* recv_x = nullptr;
  uint8_t* recv_scales = nullptr;
  uint8_t* recv_idx = nullptr;
  int32_t recv_idx_i64 = 0;
  float* recv_w = nullptr;
  int64_t out_rows = 0;
  int32_t* recv_count = nullptr;
  Workspace ws;
  NetworkArgs net;
  ForwardTable fwd;  // two hops, not cached: the handle's, written by the network kernel
};

struct CombineArgs {
  SyncArgs sync;
  uint8_t* const* xchg = nullptr;
  ExchangeLayout xl;
  uint64_t off_done = 0;
  uint32_t desc[core::kDescWords] = {};
  Published pub{};         // as for dispatch
  Published shared_pub{};
  Staging stage;
  int64_t tokens = 0;
  int32_t hidden = 0, topk = 0, h_topk = 0;
  const int32_t* h_state = nullptr;
  const int32_t* h_slot = nullptr;
  const int32_t* h_prefix = nullptr;
  const uint8_t* bias0 = nullptr;
  const uint8_t* bias1 = nullptr;
  int64_t bias0_stride = 0, bias1_stride = 0;
  uint8_t* out = nullptr;
  int64_t out_stride = 0;
  float* out_w = nullptr;  // [T][topk] dense
  Workspace ws;
  NetworkArgs net;  // two hops (combine_network.cu); else relay is null
  ForwardTable fwd;
  int32_t hierarchical = 0;  // two hops: reduce per node, DeepEP's way (core/internode.h), instead of the chain
};

// Threads of the kernels that wait for peers (one block each per rank): what the co-residency
// check sizes.
inline constexpr int kSyncThreads = 512;
// Threads per block of the copy kernels; their grids never exceed the rank's SM budget.
inline constexpr int kCopyThreads = 512;
// Rank `owner`'s published inputs as addresses of this rank's address space.
__device__ __forceinline__ Published published_by(uint8_t* const* xchg, uint64_t off_pub, uint8_t* const* bases,
                                                  int owner) {
  Published p = *reinterpret_cast<const Published*>(xchg[owner] + off_pub);
  const uint8_t* view = bases[owner];
  // In integers: for virtual ranks the inputs and the buffer are unrelated allocations.
  auto shift = [&](const uint8_t* q) {
    return q == nullptr ? q
                        : reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(view) +
                                                           (reinterpret_cast<uintptr_t>(q) -
                                                            reinterpret_cast<uintptr_t>(p.origin)));
  };
  p.x = shift(p.x);
  p.scales = shift(p.scales);
  p.topk_idx = shift(p.topk_idx);
  p.topk_w = shift(p.topk_w);
  p.cx = shift(p.cx);
  p.cw = shift(p.cw);
  p.expanded_row = reinterpret_cast<const int32_t*>(shift(reinterpret_cast<const uint8_t*>(p.expanded_row)));
  p.origin = view;
  return p;
}

// Ranks one buffer set may have on this backend (a combine lists a token's sources in shared
// memory): every rank of a group of virtual ranks.
inline constexpr int kMaxSources = SY_MAX_LOCAL_RANKS;

// Stage 1 of dispatch (route, rank, exchange). `blocks` is the SM budget. The exchange kernel
// is launched even when an earlier launch failed (then as a rejection, so the peers fail at
// once instead of waiting); `exchanged` says whether it was, i.e. whether the peers count on
// this epoch.
cudaError_t launch_dispatch_notify(const DispatchArgs& a, int blocks, cudaStream_t stream, bool* exchanged);
// Two hops: the network hop and the forwarding (normal_network.cu), after stage 1; the chain of
// the combine (combine_network.cu), after its barrier.
cudaError_t launch_dispatch_network(const DispatchArgs& a, cudaStream_t stream);
cudaError_t launch_combine_network(const CombineArgs& a, cudaStream_t stream);
// Stage 2 (receive, finish).
cudaError_t launch_dispatch_receive(const DispatchArgs& a, int blocks, cudaStream_t stream);
// Instead of stage 2 when the host gave up after stage 1: only the end handshake.
cudaError_t launch_dispatch_abandon(const DispatchArgs& a, cudaStream_t stream);
// The combine kernels; `exchanged` as for dispatch (the end handshake is launched whenever the
// exchange was).
cudaError_t launch_combine(const CombineArgs& a, int blocks, cudaStream_t stream, bool* exchanged);

// A refused call's place in the operation sequence (Backend::reject): the barrier alone, with
// `desc` marked rejected (core::rejected_desc); nothing follows it on any rank.
struct RejectedDesc {
  uint32_t words[core::kDescWords];
};
cudaError_t launch_reject(const SyncArgs& a, const RejectedDesc& desc, cudaStream_t stream);
// Writes this rank's abort record into every peer: it gave up because rank `peer` failed.
cudaError_t launch_abandon(const SyncArgs& a, int peer, cudaStream_t stream);

// The last kernel of every operation (normal_dispatch.cu). `role` names the wait in a timeout.
__global__ void finish_kernel(SyncArgs a, uint64_t off_done, core::WaitRole role, const int32_t* passed,
                              int32_t* state, LateHop late);

// The kernel that waits for peers, for the occupancy check.
const void* sync_kernel_for_occupancy();

}  // namespace sy::cuda
