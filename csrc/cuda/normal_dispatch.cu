// Normal-mode dispatch kernels (the sequence is described in normal_kernels.h).
#include <cstdint>

#include "../core/routing.h"
#include "normal_kernels.h"
#include "ordered_rank.cuh"
#include "row_copy.cuh"

namespace sy::cuda {

ExchangeLayout exchange_layout(int ranks, int max_tokens, int nodes) {
  ExchangeLayout l;
  const uint64_t R = uint64_t(ranks);
  uint64_t o = 0;
  l.off_pub = o;
  o = core::align_up(o + sizeof(Published), core::kRegionAlignBytes);
  l.off_send_counts = o;
  o = core::align_up(o + 4 * R, core::kRegionAlignBytes);
  l.off_expert_send = o;
  o = core::align_up(o + 4 * R * uint64_t(core::kMaxExpertsPerRank), core::kRegionAlignBytes);
  l.off_send_list = o;
  o = core::align_up(o + 4 * R * uint64_t(max_tokens), core::kRegionAlignBytes);
  l.off_node_send = o;
  o = core::align_up(o + 4 * uint64_t(nodes), core::kRegionAlignBytes);
  l.bytes = o;
  return l;
}

SharedLayout shared_layout(const core::BufferPlan& plan, bool staged) {
  SharedLayout s;
  s.xl = exchange_layout(plan.ranks, plan.max_tokens_per_rank, plan.nodes);
  // After the header and the low-latency halves (core/plan.h), both read and written by the peers.
  const uint64_t shared_plan = plan.ll.experts > 0 ? plan.ll.off_halves + 2 * plan.ll.half_bytes : plan.header_bytes;
  s.off_xchg = core::align_up(shared_plan, core::kRegionAlignBytes);
  uint64_t o = core::align_up(s.off_xchg + s.xl.bytes, core::kRegionAlignBytes);
  s.staged = staged;
  if (staged) {
    s.off_records = o;
    o = core::align_up(o + uint64_t(plan.max_tokens_per_rank) * uint64_t(plan.record_bytes), core::kRegionAlignBytes);
    s.off_rows = o;
    o = core::align_up(o + uint64_t(plan.max_recv_rows()) * uint64_t(plan.combine_row_bytes), core::kRegionAlignBytes);
  }
  s.two_hop = plan.two_hop();
  if (s.two_hop) {
    s.off_relay = o;
    o = core::align_up(o + uint64_t(plan.ranks - plan.ranks_per_node) * uint64_t(plan.max_tokens_per_rank) *
                               uint64_t(plan.record_bytes),
                       core::kRegionAlignBytes);
    s.off_net_in = o;
    o = core::align_up(o + plan.net_region_bytes, core::kRegionAlignBytes);
    s.off_net_out = o;
    o = core::align_up(o + plan.net_region_bytes, core::kRegionAlignBytes);
  }
  s.bytes = core::align_up(o, 4096);
  return s;
}

__global__ void __launch_bounds__(kRankScanThreads) rank_scan_kernel(int64_t chunks, int keys, int32_t* counts,
                                                                     int32_t* totals) {
  SY_SHARED(int32_t[kRankScanThreads], part);
  const int key = blockIdx.x;
  const int64_t per = (chunks + blockDim.x - 1) / blockDim.x;
  const int64_t begin = int64_t(threadIdx.x) * per;
  const int64_t end = begin + per < chunks ? begin + per : chunks;
  int32_t sum = 0;
  for (int64_t c = begin; c < end; ++c) sum += counts[c * keys + key];
  part[threadIdx.x] = sum;
  __syncthreads();
  for (int off = 1; off < int(blockDim.x); off *= 2) {
    const int32_t v = int(threadIdx.x) >= off ? part[threadIdx.x - off] : 0;
    __syncthreads();
    part[threadIdx.x] += v;
    __syncthreads();
  }
  int32_t run = part[threadIdx.x] - sum;
  for (int64_t c = begin; c < end; ++c) {
    const int32_t v = counts[c * keys + key];
    counts[c * keys + key] = run;
    run += v;
  }
  if (threadIdx.x == blockDim.x - 1) totals[key] = part[threadIdx.x];
}

namespace {

__device__ __forceinline__ int64_t load_idx(const uint8_t* base, int64_t off, bool i64) {
  return i64 ? *reinterpret_cast<const int64_t*>(base + off) : int64_t(*reinterpret_cast<const int32_t*>(base + off));
}

__device__ __forceinline__ int32_t* exchange_i32(const DispatchArgs& a, int owner, uint64_t off) {
  return reinterpret_cast<int32_t*>(a.xchg[owner] + off);
}

__device__ __forceinline__ Published published(const DispatchArgs& a, int owner) {
  return published_by(a.xchg, a.xl.off_pub, a.sync.bases, owner);
}

// Process groups: one warp per token copies its row, scales, top-k experts (as i32) and weights
// into record t of this rank's buffer, where the peers read them (normal_kernels.h).
__global__ void __launch_bounds__(kCopyThreads) stage_dispatch_kernel(DispatchArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  const Published& p = a.pub;
  const Staging& s = a.stage;
  for (int64_t t = warp; t < a.tokens; t += warps) {
    uint8_t* rec = s.base + t * s.stride;
    uint8_t* row = rec + s.payload;
    warp_copy_row(p.x + t * p.x_stride, [row](int) { return row; }, 1, a.payload_bytes, lane);
    for (int i = lane; i < a.num_scales; i += 32) {
      reinterpret_cast<uint32_t*>(rec + s.scales)[i] =
          *reinterpret_cast<const uint32_t*>(p.scales + t * p.scale_st + i * p.scale_ss);
    }
    for (int k = lane; k < a.topk; k += 32) {
      reinterpret_cast<int32_t*>(rec + s.topk_idx)[k] =
          int32_t(load_idx(p.topk_idx, t * p.idx_st + k * p.idx_sk, p.idx_i64 != 0));
      if (p.topk_w != nullptr) {
        reinterpret_cast<float*>(rec + s.topk_weights)[k] =
            *reinterpret_cast<const float*>(p.topk_w + t * p.w_st + k * p.w_sk);
      }
    }
  }
}

// Two hops: counts the token once for every node it goes to (`to(d)`: whether it goes to rank d).
template <class To>
__device__ __forceinline__ void count_nodes(const DispatchArgs& a, To to) {
  int32_t* node_send = exchange_i32(a, a.sync.rank, a.xl.off_node_send);
  const int P = a.net.ranks_per_node;
  for (int m = 0; m < a.net.nodes; ++m) {
    bool any = false;
    for (int q = 0; q < P && !any; ++q) any = to(m * P + q);
    if (any) atomicAdd(&node_send[m], 1);
  }
}

// One thread per token: check its top-k row, mark its destinations, count it per
// (destination, local expert) for the destinations it goes to.
__global__ void route_kernel(DispatchArgs a) {
  const int R = a.sync.ranks;
  const int me = a.sync.rank;
  const int EL = a.local_experts;
  int32_t* expert_send = exchange_i32(a, me, a.xl.off_expert_send);
  const Published& p = a.pub;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < a.tokens; t += int64_t(gridDim.x) * blockDim.x) {
    uint8_t* row = a.h_route + t * R;
    auto at = [&](int k) { return load_idx(p.topk_idx, t * p.idx_st + k * p.idx_sk, p.idx_i64 != 0); };
    if (a.topk > 0) {
      int bad = -1;
      if (core::check_topk_row(at, a.topk, a.experts, &bad) != core::TopkProblem::None) {
        note_problem(&a.sync.report->problem, t);
        for (int d = 0; d < R; ++d) row[d] = 0;
        continue;
      }
    }
    if (a.user_route != nullptr) {
      for (int d = 0; d < R; ++d) row[d] = a.user_route[t * a.route_st + d * a.route_sr] ? 1 : 0;
    } else {
      for (int d = 0; d < R; ++d) row[d] = 0;
      for (int k = 0; k < a.topk; ++k) {
        const int64_t e = at(k);
        if (e >= 0) row[core::expert_owner(e, EL)] = 1;
      }
    }
    for (int k = 0; k < a.topk; ++k) {
      const int64_t e = at(k);
      if (e < 0) continue;
      const int owner = core::expert_owner(e, EL);
      if (row[owner]) atomicAdd(&expert_send[owner * EL + int(e - int64_t(owner) * EL)], 1);
    }
    if (a.net.relay != nullptr) count_nodes(a, [&](int d) { return row[d] != 0; });
  }
}

// Ranks tokens per destination: slot[t][d] and the send list of d.
struct SendRanker {
  const uint8_t* route;
  int32_t* slot;
  int32_t* send_list;
  int ranks;
  int max_tokens;
  const KernelReport* report;
  __device__ bool skip() const { return op_failed(report); }
  __device__ int entry_of(int64_t t, int d) const { return route[t * ranks + d] ? d : -1; }
  __device__ void put(int64_t t, int d, int, int32_t r) const {
    slot[t * ranks + d] = r;
    send_list[int64_t(d) * max_tokens + r] = int32_t(t);
  }
  __device__ void miss(int64_t t, int d) const { slot[t * ranks + d] = -1; }
};

// Cached dispatch: the send lists and counts come from the handle's slots and prefix matrix.
__global__ void cached_sends_kernel(DispatchArgs a) {
  const int R = a.sync.ranks;
  const int me = a.sync.rank;
  int32_t* list = exchange_i32(a, me, a.xl.off_send_list);
  int32_t* counts = exchange_i32(a, me, a.xl.off_send_counts);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < a.tokens * R; i += stride) {
    const int32_t s = a.h_slot[i];
    if (s >= 0) list[int64_t(i % R) * a.max_tokens + s] = int32_t(i / R);
  }
  if (a.net.relay != nullptr) {
    for (int64_t t = first; t < a.tokens; t += stride) count_nodes(a, [&](int d) { return a.h_slot[t * R + d] >= 0; });
  }
  for (int64_t d = first; d < R; d += stride) {
    counts[d] = int32_t(core::rows_from([&](int i) { return a.h_prefix[int64_t(i) * R + d]; }, me));
  }
}

// One block: publish, barrier, counts. Everything a rank learns about the others comes from
// here.
__global__ void __launch_bounds__(kSyncThreads) dispatch_exchange_kernel(DispatchArgs a) {
  KernelReport* rep = a.sync.report;
  const int R = a.sync.ranks;
  const int me = a.sync.rank;
  const int EL = a.local_experts;
  SY_SHARED(uint32_t[core::kDescWords], desc);
  SY_SHARED(int64_t, received);
  SY_SHARED(bool, stop);
  if (threadIdx.x == 0) {
    st_release_sys(&rep->exchange_started, 1u);  // the host's deadline for the counts starts now
    for (int i = 0; i < core::kDescWords; ++i) desc[i] = a.desc[i];
    // Bad routing found by the route kernel: the barrier tells the peers, so the operation
    // fails everywhere and the buffers stay usable.
    if (a.topk > 0) {
      const Published& p = a.pub;
      auto at = [&](int64_t t, int k) { return load_idx(p.topk_idx, t * p.idx_st + k * p.idx_sk, p.idx_i64 != 0); };
      finish_problem(&rep->problem, at, a.topk, a.experts);
    }
    // Rejected by the host (an earlier launch failed) or by the route kernel (bad routing).
    desc[core::kDescRejected] = a.desc[core::kDescRejected] != 0 || ld_volatile(&rep->problem.flag) != 0 ? 1u : 0u;
    *reinterpret_cast<Published*>(a.xchg[me] + a.xl.off_pub) = a.shared_pub;
    *a.ws.passed_barrier = 0;
  }
  __syncthreads();
  if (!barrier(a.sync, desc)) {
    if (threadIdx.x == 0) st_release_sys(&rep->counts_flag, 2u);
    return;
  }

  // Column j of the prefix matrix: rows sent to j by ranks 0..i. Column `me` gives where each
  // source's rows start here.
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    int32_t acc = 0;
    for (int i = 0; i < R; ++i) {
      const int32_t c = exchange_i32(a, i, a.xl.off_send_counts)[j];
      if (j == me) {
        a.ws.recv_start[i] = acc;
        a.ws.recv_cnt[i] = c;
      }
      acc += c;
      if (!a.cached) a.h_prefix[int64_t(i) * R + j] = acc;
    }
    if (j == me) received = acc;
  }
  for (int l = threadIdx.x; l < EL && a.topk > 0; l += blockDim.x) {
    int32_t c = 0;
    for (int p = 0; p < R; ++p) c += exchange_i32(a, p, a.xl.off_expert_send)[int64_t(me) * EL + l];
    a.ws.expert_count[l] = c;
    rep->expert_counts[l] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t rows = received;
    if (a.layout == SY_LAYOUT_EXPANDED) {
      if (a.cached) {
        rows = a.cached_rows;
      } else {
        rows = core::expanded_rows(a.ws.expert_count, EL, a.alignment, a.ws.group_base);
        core::padding_rows(a.ws.expert_count, EL, a.alignment, a.ws.pad_prefix);
      }
    }
    a.ws.totals[0] = received;
    a.ws.totals[1] = rows;
    FailureInfo f;
    if (a.cached && received != a.cached_tokens) {
      f.kind = KernelFailure::CachedMismatch;
      f.expected = a.cached_tokens;
      f.observed = received;
    } else if (a.out_rows >= 0 && (received > a.h_cap || (a.layout == SY_LAYOUT_COMPACT && received > a.out_rows))) {
      f.kind = KernelFailure::Capacity;
      f.expected = a.h_cap < a.out_rows ? a.h_cap : a.out_rows;
      f.observed = received;
    } else if (a.out_rows >= 0 && rows > a.out_rows) {
      f.kind = KernelFailure::Capacity;
      f.expected = a.out_rows;
      f.observed = rows;
      f.a = 1;  // expanded rows
    }
    if (f.kind != KernelFailure::None) report_failure(rep, f);
    rep->num_local_experts = a.topk > 0 ? EL : 0;
    rep->num_recv = received;
    __threadfence_system();
    st_release_sys(&rep->counts_flag, 1u);
    // A handle that does not fit what the peers sent means the ranks disagree about the
    // routing: as on the host backend, the peers are told and the buffer set is given up.
    // Otherwise the operation goes on to its end handshake, failed or not.
    *a.ws.passed_barrier = f.kind == KernelFailure::CachedMismatch ? 0 : 1;
    stop = f.kind == KernelFailure::CachedMismatch;
  }
  __syncthreads();
  if (stop) abort_peers(a.sync, -1, core::WaitRole::None, uint32_t(SY_ERROR_INVALID_ARGUMENT));
}

// Whether rank `r`'s records reach this rank through a forwarder (two hops, another node).
__device__ __forceinline__ bool relayed(const DispatchArgs& a, int r) {
  return a.net.relay != nullptr &&
         core::node_of(r, a.net.ranks_per_node) != core::node_of(a.sync.rank, a.net.ranks_per_node);
}

// Where this rank reads rank `owner`'s tokens: its published inputs, or, two hops away, the
// records its forwarder delivered into this rank's relay region, indexed by slot (a view with
// the records' strides: i32 top-k entries, f32 weights and scale words).
__device__ __forceinline__ Published dispatch_view(const DispatchArgs& a, int owner) {
  Published p = published(a, owner);
  if (!relayed(a, owner)) return p;
  const NetworkArgs& n = a.net;
  const uint8_t* base = n.relay + uint64_t(relay_index(owner, core::node_of(a.sync.rank, n.ranks_per_node),
                                                       n.ranks_per_node)) *
                                      uint64_t(a.max_tokens) * uint64_t(n.record_bytes);
  p.x = base + n.rec_payload;
  p.x_stride = n.record_bytes;
  p.scales = p.scales ? base + n.rec_scales : nullptr;
  p.scale_st = n.record_bytes;
  p.scale_ss = 4;
  p.topk_idx = p.topk_idx ? base + n.rec_topk_idx : nullptr;
  p.idx_st = n.record_bytes;
  p.idx_sk = 4;
  p.idx_i64 = 0;
  p.topk_w = p.topk_w ? base + n.rec_topk_weights : nullptr;
  p.w_st = n.record_bytes;
  p.w_sk = 4;
  p.tokens = a.max_tokens;
  return p;
}

// Where received row n comes from: its source rank (binary search over the row starts), the
// row of the source's view that holds it (dispatch_view), and the sender's token index.
struct Source {
  int rank;
  int32_t token;   // in dispatch_view(rank); -1: nothing to read
  int32_t origin;  // the sender's token index (the handle's)
};

__device__ __forceinline__ Source find_source(const DispatchArgs& a, const int32_t* starts, int64_t n) {
  int lo = 0, hi = a.sync.ranks - 1;
  while (lo < hi) {  // the last source whose rows start at or before n
    const int mid = (lo + hi + 1) / 2;
    if (starts[mid] <= n) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int32_t slot = int32_t(n - starts[lo]);
  const int64_t tokens = published(a, lo).tokens;
  auto wrong = [&](int32_t token) {
    // Never read past the sender's rows, whatever the lists say (they come from another rank).
    FailureInfo f;
    f.kind = KernelFailure::Internal;
    f.a = -1;
    f.peer = lo;
    f.expected = tokens;
    f.observed = token;
    report_failure(a.sync.report, f);
    return Source{lo, -1, -1};
  };
  if (relayed(a, lo)) {
    // The relay region holds the source's records by slot; each says which token it is.
    if (slot >= a.max_tokens) return wrong(slot);
    const uint8_t* rec = a.net.relay + (uint64_t(relay_index(lo, core::node_of(a.sync.rank, a.net.ranks_per_node),
                                                             a.net.ranks_per_node)) *
                                            uint64_t(a.max_tokens) +
                                        uint64_t(slot)) *
                                           uint64_t(a.net.record_bytes);
    const int32_t origin = *reinterpret_cast<const int32_t*>(rec + a.net.rec_src_idx);
    if (origin < 0 || origin >= tokens) return wrong(origin);
    return {lo, slot, origin};
  }
  const int32_t* list = exchange_i32(a, lo, a.xl.off_send_list) + int64_t(a.sync.rank) * a.max_tokens;
  const int32_t token = slot < a.max_tokens ? list[slot] : -1;
  if (token < 0 || token >= tokens) return wrong(token);
  return {lo, token, token};
}

__device__ __forceinline__ void store_idx(uint8_t* base, int64_t i, bool i64, int64_t v) {
  if (i64) {
    reinterpret_cast<int64_t*>(base)[i] = v;
  } else {
    reinterpret_cast<int32_t*>(base)[i] = int32_t(v);
  }
}

// Scales of token t of the sender into the output rows row_of(r), r < nrows (-1: none).
template <class RowOf>
__device__ __forceinline__ void copy_scales(const DispatchArgs& a, const Published& p, int32_t t, RowOf row_of,
                                            int nrows, int lane) {
  for (int s = lane; s < a.num_scales; s += 32) {
    const uint32_t v = *reinterpret_cast<const uint32_t*>(p.scales + t * p.scale_st + s * p.scale_ss);
    for (int r = 0; r < nrows; ++r) {
      const int64_t row = row_of(r);
      if (row >= 0) reinterpret_cast<uint32_t*>(a.recv_scales)[row * a.num_scales + s] = v;
    }
  }
}

// The bookkeeping every receive kernel starts with: nothing to do after a failure; the row
// starts of the sources in shared memory.
__device__ bool receive_prologue(const DispatchArgs& a, int32_t* starts) {
  SY_SHARED(int, go);
  if (threadIdx.x == 0) go = op_failed(a.sync.report) ? 0 : 1;
  __syncthreads();
  if (go == 0) return false;
  for (int i = threadIdx.x; i < a.sync.ranks; i += blockDim.x) starts[i] = a.ws.recv_start[i];
  __syncthreads();
  return true;
}

// Compact layout: one warp per received row, pulled from the sender's input.
__global__ void __launch_bounds__(kCopyThreads) receive_compact_kernel(DispatchArgs a) {
  SY_DYNAMIC_SHARED(int32_t, starts);
  if (!receive_prologue(a, starts)) return;
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int64_t N = a.ws.totals[0];
  const int me = a.sync.rank;
  for (int64_t n = warp; n < N; n += warps) {
    const Source src = find_source(a, starts, n);
    if (src.token < 0) continue;
    const Published p = dispatch_view(a, src.rank);
    uint8_t* dst = a.recv_x + n * a.payload_bytes;
    warp_copy_row(p.x + src.token * p.x_stride, [dst](int) { return dst; }, 1, a.payload_bytes, lane);
    copy_scales(a, p, src.token, [n](int) { return n; }, 1, lane);
    for (int k = lane; k < a.topk; k += 32) {
      const int64_t e = load_idx(p.topk_idx, src.token * p.idx_st + k * p.idx_sk, p.idx_i64 != 0);
      const int32_t local = core::local_expert(e, me, a.local_experts);
      store_idx(a.recv_idx, n * a.topk + k, a.recv_idx_i64 != 0, local);
      a.recv_w[n * a.topk + k] =
          local >= 0 ? *reinterpret_cast<const float*>(p.topk_w + src.token * p.w_st + k * p.w_sk) : 0.0f;
    }
    if (lane == 0) {
      a.h_src_idx[n] = src.origin;
      a.h_src_rank[n] = src.rank;
    }
  }
  // Worst-case tail: no expert, no weight, no source.
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = N * a.topk + first; i < a.out_rows * a.topk; i += stride) {
    store_idx(a.recv_idx, i, a.recv_idx_i64 != 0, -1);
    a.recv_w[i] = 0.0f;
  }
  for (int64_t i = N + first; i < a.h_cap; i += stride) {
    a.h_src_idx[i] = -1;
    a.h_src_rank[i] = -1;
  }
  if (first == 0) *a.recv_count = int32_t(N);
}

// Expanded layout, step 1: the local experts of every received token, and its source.
__global__ void __launch_bounds__(kCopyThreads) gather_experts_kernel(DispatchArgs a) {
  SY_DYNAMIC_SHARED(int32_t, starts);
  if (!receive_prologue(a, starts)) return;
  const int64_t N = a.ws.totals[0];
  const int K = a.h_topk;
  const int W = (a.local_experts + 31) / 32;
  const int me = a.sync.rank;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t n = first; n < a.h_cap; n += stride) {
    if (n >= N) {
      a.h_src_idx[n] = -1;
      a.h_src_rank[n] = -1;
      for (int k = 0; k < K; ++k) a.h_exp_row[n * K + k] = -1;
      continue;
    }
    const Source src = find_source(a, starts, n);
    if (src.token < 0) continue;
    const Published p = dispatch_view(a, src.rank);
    uint32_t* mask = a.ws.recv_mask + n * W;
    for (int w = 0; w < W; ++w) mask[w] = 0;
    for (int k = 0; k < K; ++k) {
      const int64_t e = load_idx(p.topk_idx, src.token * p.idx_st + k * p.idx_sk, p.idx_i64 != 0);
      const int32_t l = core::local_expert(e, me, a.local_experts);
      a.ws.recv_local[n * K + k] = l;
      if (l >= 0) mask[l / 32] |= 1u << (l % 32);
      a.h_exp_row[n * K + k] = -1;
    }
    a.h_src_idx[n] = src.origin;
    a.h_src_rank[n] = src.rank;
  }
}

// Expanded layout, step 2: each received entry's row in its local expert's group. A row's
// bit mask answers "does token n have local expert l" in one load, so the two ranking passes
// cost O(N * EL) loads plus O(N * K) for the entries held, not O(N * EL * K).
struct ExpertRanker {
  const int32_t* recv_local;
  const uint32_t* recv_mask;
  int32_t* exp_row;
  const int64_t* group_base;
  const int64_t* totals;
  int K, W;
  const KernelReport* report;
  __device__ bool skip() const { return op_failed(report); }
  __device__ int entry_of(int64_t n, int l) const {
    if (n >= totals[0] || ((recv_mask[n * W + l / 32] >> (l % 32)) & 1u) == 0) return -1;
    for (int k = 0; k < K; ++k)
      if (recv_local[n * K + k] == l) return k;
    return -1;
  }
  __device__ void put(int64_t n, int l, int k, int32_t r) const { exp_row[n * K + k] = int32_t(group_base[l] + r); }
  __device__ void miss(int64_t, int) const {}
};

// Expanded layout, step 3: pull each received token once and write it into every row it owns.
__global__ void __launch_bounds__(kCopyThreads) receive_expanded_kernel(DispatchArgs a) {
  SY_DYNAMIC_SHARED(int32_t, starts);
  SY_SHARED(int32_t[kCopyThreads / 32][core::kMaxTopk], rows_of);
  if (!receive_prologue(a, starts)) return;
  KernelReport* rep = a.sync.report;
  const int K = a.h_topk;
  const int EL = a.local_experts;
  if (!a.cached) {
    // The rows the peers announced must be the rows that arrived.
    for (int l = threadIdx.x; l < EL; l += blockDim.x) {
      if (a.ws.rank_totals[l] == a.ws.expert_count[l]) continue;
      FailureInfo f;
      f.kind = KernelFailure::Internal;
      f.a = l;
      f.expected = a.ws.expert_count[l];
      f.observed = a.ws.rank_totals[l];
      report_failure(rep, f);
    }
    __syncthreads();
    if (ld_volatile(&rep->fail_flag) != 0) return;
  }
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int64_t N = a.ws.totals[0];
  for (int64_t n = warp; n < N; n += warps) {
    // The sender's own list says which token this row is (a cached handle only supplies rows).
    const Source src = find_source(a, starts, n);
    const int32_t t = src.token;
    if (t < 0) continue;
    const Published p = dispatch_view(a, src.rank);
    // The token's rows, one per top-k entry (-1: not a local expert), shared by the warp.
    int32_t* rows = rows_of[threadIdx.x / 32];
    if (lane < K) rows[lane] = a.h_exp_row[n * K + lane];
    __syncwarp();
    auto dst_of = [&](int k) { return rows[k] >= 0 ? a.recv_x + int64_t(rows[k]) * a.payload_bytes : nullptr; };
    warp_copy_row(p.x + t * p.x_stride, dst_of, K, a.payload_bytes, lane);
    copy_scales(a, p, t, [&](int k) { return int64_t(rows[k]); }, K, lane);
    if (!a.cached && lane < K && rows[lane] >= 0) {
      a.recv_w[rows[lane]] = *reinterpret_cast<const float*>(p.topk_w + t * p.w_st + lane * p.w_sk);
    }
    __syncwarp();  // the rows are rewritten for the next token
  }
  // Rows that hold no token: each group's padding, then everything past the last group (worst
  // case). Their weight is 0; their payload is zeroed only when asked (outputs are not
  // zero-filled when allocated). A warp per row, spread over the whole grid.
  const int64_t rows_used = a.ws.totals[1];
  const bool zero = a.zero_padding && !a.cached;
  const int64_t pad = a.cached ? 0 : a.ws.pad_prefix[EL];  // padding rows of all groups
  for (int64_t i = warp; i < pad + (a.out_rows - rows_used); i += warps) {
    const int64_t r = i < pad ? core::padding_row(a.ws.pad_prefix, a.ws.group_base, a.ws.expert_count, EL, i)
                              : rows_used + (i - pad);
    if (lane == 0 && a.recv_w != nullptr) a.recv_w[r] = 0.0f;
    if (zero) zero_row(a.recv_x + r * a.payload_bytes, a.payload_bytes, lane);
    for (int s = lane; zero && s < a.num_scales; s += 32) reinterpret_cast<uint32_t*>(a.recv_scales)[r * a.num_scales + s] = 0;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.recv_count = int32_t(rows_used);
}

}  // namespace

// The end of an operation, shared by dispatch and combine: tell every source that its inputs
// have been read, and wait until every peer has read ours (the caller may overwrite them once
// the operation completes). Skipped when the barrier failed: then nobody read anything.
__global__ void __launch_bounds__(kSyncThreads) finish_kernel(SyncArgs a, uint64_t off_done, core::WaitRole role,
                                                               const int32_t* passed, int32_t* state, LateHop late) {
  if (*passed == 1) {
    signal_peers(a, off_done);
    wait_peers(a, off_done, role, late);
  }
  if (threadIdx.x == 0 && state != nullptr) *state = op_failed(a.report) ? 2 : 1;
}

const void* sync_kernel_for_occupancy() { return reinterpret_cast<const void*>(&finish_kernel); }

namespace {

__global__ void __launch_bounds__(kSyncThreads) reject_kernel(SyncArgs a, RejectedDesc desc) {
  SY_SHARED(uint32_t[core::kDescWords], words);
  if (threadIdx.x == 0)
    for (int i = 0; i < core::kDescWords; ++i) words[i] = desc.words[i];
  __syncthreads();
  (void)barrier(a, words);  // false by construction; a timeout has been reported and told
}

}  // namespace

namespace {
__global__ void __launch_bounds__(kSyncThreads) abandon_kernel(SyncArgs a, int peer) {
  abort_peers(a, peer, core::WaitRole::BufferPeers, uint32_t(SY_ERROR_PEER_FAILED));
}
}  // namespace

cudaError_t launch_abandon(const SyncArgs& a, int peer, cudaStream_t stream) {
  SY_LAUNCH(abandon_kernel, 1, kSyncThreads, 0, stream)(a, peer);
  return cudaGetLastError();
}

cudaError_t launch_reject(const SyncArgs& a, const RejectedDesc& desc, cudaStream_t stream) {
  SY_LAUNCH(reject_kernel, 1, kSyncThreads, 0, stream)(a, desc);
  return cudaGetLastError();
}

namespace {

int grid_for(int64_t work, int threads, int budget) {
  int64_t b = (work + threads - 1) / threads;
  if (b < 1) b = 1;
  return int(b < budget ? b : budget);
}

}  // namespace

cudaError_t launch_dispatch_notify(const DispatchArgs& a, int blocks, cudaStream_t stream, bool* exchanged) {
  const int R = a.sync.ranks;
  cudaError_t rc = cudaSuccess;
  if (a.net.relay != nullptr) {
    rc = cudaMemsetAsync(a.own_xchg + a.xl.off_node_send, 0, sizeof(int32_t) * size_t(a.net.nodes), stream);
  }
  if (rc == cudaSuccess && a.cached) {
    SY_LAUNCH(cached_sends_kernel, grid_for(a.tokens * R, 256, blocks), 256, 0, stream)(a);
    rc = cudaGetLastError();
  } else if (rc == cudaSuccess) {
    auto* counts = reinterpret_cast<int32_t*>(a.own_xchg + a.xl.off_send_counts);
    rc = cudaMemsetAsync(counts, 0, sizeof(int32_t) * size_t(R), stream);
    if (rc == cudaSuccess && a.topk > 0) {
      rc = cudaMemsetAsync(a.own_xchg + a.xl.off_expert_send, 0, sizeof(int32_t) * size_t(R) * size_t(a.local_experts),
                           stream);
    }
    if (rc == cudaSuccess) {
      SY_LAUNCH(route_kernel, grid_for(a.tokens, 256, blocks), 256, 0, stream)(a);
      rc = cudaGetLastError();
    }
    if (rc == cudaSuccess) {
      const SendRanker rk{a.h_route, a.h_slot, reinterpret_cast<int32_t*>(a.own_xchg + a.xl.off_send_list), R,
                          a.max_tokens, a.sync.report};
      rc = launch_ordered_rank(rk, a.tokens, R, a.ws.rank_counts, counts, blocks, stream);
    }
  }
  if (rc == cudaSuccess && a.stage.base != nullptr && a.tokens > 0) {
    SY_LAUNCH(stage_dispatch_kernel, grid_for(a.tokens * 32, kCopyThreads, blocks), kCopyThreads, 0, stream)(a);
    rc = cudaGetLastError();
  }
  DispatchArgs x = a;
  if (rc != cudaSuccess) x.desc[core::kDescRejected] = 1u;  // nothing valid to exchange: the peers fail now
  SY_LAUNCH(dispatch_exchange_kernel, 1, kSyncThreads, 0, stream)(x);
  const cudaError_t launched = cudaGetLastError();
  *exchanged = launched == cudaSuccess;
  return rc != cudaSuccess ? rc : launched;
}

cudaError_t launch_dispatch_receive(const DispatchArgs& a, int blocks, cudaStream_t stream) {
  const size_t starts = sizeof(int32_t) * size_t(a.sync.ranks);
  if (a.layout == SY_LAYOUT_COMPACT) {
    SY_LAUNCH(receive_compact_kernel, blocks, kCopyThreads, starts, stream)(a);
  } else {
    if (!a.cached) {
      SY_LAUNCH(gather_experts_kernel, grid_for(a.h_cap, kCopyThreads, blocks), kCopyThreads, starts, stream)(a);
      const int words = (a.local_experts + 31) / 32;
      const ExpertRanker rk{a.ws.recv_local, a.ws.recv_mask, a.h_exp_row, a.ws.group_base,
                            a.ws.totals,     a.h_topk,       words,       a.sync.report};
      const cudaError_t rc =
          launch_ordered_rank(rk, a.h_cap, a.local_experts, a.ws.rank_counts, a.ws.rank_totals, blocks, stream);
      if (rc != cudaSuccess) return rc;
    }
    SY_LAUNCH(receive_expanded_kernel, blocks, kCopyThreads, starts, stream)(a);
  }
  SY_LAUNCH(finish_kernel, 1, kSyncThreads, 0, stream)(a.sync, a.off_done, core::WaitRole::DispatchNotify,
                                                      a.ws.passed_barrier, a.cached ? nullptr : a.h_state,
                                                      late_network_hop(a.net, core::WaitRole::DispatchNetwork));
  return cudaGetLastError();
}

cudaError_t launch_dispatch_abandon(const DispatchArgs& a, cudaStream_t stream) {
  SY_LAUNCH(finish_kernel, 1, kSyncThreads, 0, stream)(a.sync, a.off_done, core::WaitRole::DispatchNotify,
                                                      a.ws.passed_barrier, nullptr,
                                                      late_network_hop(a.net, core::WaitRole::DispatchNetwork));
  return cudaGetLastError();
}

}  // namespace sy::cuda
