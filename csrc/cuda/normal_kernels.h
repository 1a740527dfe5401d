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
#include "transport/proxy_channel.cuh"

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
  int32_t expanded_k, reserved1;
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
//   off_net_in          per sender node, a ring of net_ring_entries network records: what this
//                       rank forwards (core/internode.h)
//   off_net_out         per destination node, a ring of as many: the network records this rank
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

// Whether a buffer's dispatch takes two hops on this backend: across nodes, on the two-hop path,
// between virtual ranks of one process (process groups pull across nodes in one hop, for now).
inline bool cuda_two_hop(const core::BufferPlan& plan, bool process_group) {
  return plan.two_hop() && !process_group;
}

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

// The two hops of dispatch across nodes on this backend (normal_network.cu, core/internode.h).
struct NetworkArgs {
  int32_t ranks_per_node = 0, nodes = 1;
  uint8_t* relay = nullptr;  // this rank's relay region; null: one hop
  uint64_t off_relay = 0, off_net_in = 0, off_net_out = 0;
  int32_t entries = 0;  // of each network ring
  // The plan's record format, and the network record's fields after it (core/plan.h).
  int32_t record_bytes = 0, rec_payload = 0, rec_scales = 0, rec_topk_idx = 0, rec_topk_weights = 0, rec_src_idx = 0;
  int32_t net_record_bytes = 0, net_slots = 0, net_chain_next = 0, net_chain_prev = 0;
  uint64_t off_forward_epoch = 0, off_forwarded = 0;
  // Device memory: this rank's proxy channels, [nodes] to send to each node, then [nodes] to
  // credit each node's sender; the network counters that persist across operations (entries
  // put to each node's column peer, taken from each node's); 1 once a failure left them wrong.
  const transport::ProxyChannel* channels = nullptr;
  uint64_t* sent = nullptr;
  uint64_t* taken = nullptr;
  int32_t* broken = nullptr;
};

// Signal slots of the network rings: the records that landed in a forwarder's ring from a
// source, and the entries the forwarder has taken (the source's credit).
inline constexpr int kSignalRecords = 0, kSignalCredit = 1, kNetworkSignals = 2;
// The nodes a two-hop dispatch may span: the network kernel gives each node a sending and a
// forwarding warp in one block of kSyncThreads.
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
// Two hops: the network hop and the forwarding (normal_network.cu), after stage 1.
cudaError_t launch_dispatch_network(const DispatchArgs& a, cudaStream_t stream);
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
                              int32_t* state);

// The kernel that waits for peers, for the occupancy check.
const void* sync_kernel_for_occupancy();

}  // namespace sy::cuda
