// Normal-mode combine: every rank pulls, for each of its tokens, the expert outputs of the
// ranks that received it, straight from their combine inputs, and reduces them in registers in
// the order core/reduce.h fixes (biases, then source ranks in order; the expanded layout first
// sums a rank's rows of the token and rounds that to BF16, as the host backend does).
#include <cstdint>

#include "../core/routing.h"
#include "combine_rows.cuh"

namespace sy::cuda {

namespace {

__device__ __forceinline__ Published published(const CombineArgs& a, int owner) {
  return published_by(a.xchg, a.xl.off_pub, a.sync.bases, owner);
}

// Ranks that pass handles of different dispatches disagree about rows: reported, never read.
__device__ void mismatch(const CombineArgs& a, int peer, int64_t row, int64_t rows) {
  FailureInfo f;
  f.kind = KernelFailure::HandleMismatch;
  f.peer = peer;
  f.observed = row;
  f.expected = rows;
  report_failure(a.sync.report, f);
}

// One block: refuse a handle whose dispatch failed, publish, barrier.
__global__ void __launch_bounds__(kSyncThreads) combine_exchange_kernel(CombineArgs a) {
  KernelReport* rep = a.sync.report;
  SY_SHARED(uint32_t[core::kDescWords], desc);
  if (threadIdx.x == 0) {
    *a.ws.passed_barrier = 0;
    for (int i = 0; i < core::kDescWords; ++i) desc[i] = a.desc[i];
    *reinterpret_cast<Published*>(a.xchg[a.sync.rank] + a.xl.off_pub) = a.shared_pub;
  }
  __syncthreads();
  if (*a.h_state != 1) {
    // The peers wait for us at the barrier: they are told, as the host backend tells them.
    if (threadIdx.x == 0) {
      FailureInfo f;
      f.kind = KernelFailure::DispatchFailed;
      report_failure(rep, f);
    }
    abort_peers(a.sync, -1, core::WaitRole::None, uint32_t(SY_ERROR_INVALID_ARGUMENT));
    return;
  }
  if (!barrier(a.sync, desc)) return;
  if (threadIdx.x == 0) *a.ws.passed_barrier = 1;
}

// Sources reduced per batch: their loads are all in flight before the first add. Four keep the
// reduction within 64 registers without spills (-Xptxas -v, sm_90), so two blocks of 512
// threads fit an SM (__launch_bounds__ below): 8 ranks x 20 blocks run in one wave on 132 SMs
// instead of two, with as many bytes in flight per SM as eight sources in one block had.
constexpr int kSourceBatch = 4;
constexpr int kWarpsPerBlock = kCopyThreads / 32;

// Process groups: one warp per received token n copies what the peers pull for it into row n of
// this rank's buffer: its row of the combine input (expanded layout: its rows summed and rounded
// to BF16, exactly what expanded_part gives a reader), and its top-k weights (0 past the rows
// the input has, which adds nothing where a reader would have skipped them).
__global__ void __launch_bounds__(kCopyThreads) stage_combine_kernel(CombineArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  const Published& p = a.pub;
  const Staging& s = a.stage;
  for (int64_t n = warp; n < s.rows; n += warps) {
    uint8_t* row = s.base + n * s.stride;
    uint8_t* payload = row + s.payload;
    if (p.expanded_k == 0) {
      warp_copy_row(p.cx + n * p.cx_stride, [payload](int) { return payload; }, 1, int64_t(a.hidden) * 2, lane);
    } else {
      for (int g = lane; g < a.hidden / 8; g += 32) {
        float v[8];
        expanded_part(p, n, g, v);
        store_bf16x8(payload + g * 16, v);
      }
    }
    for (int k = lane; k < a.topk && p.cw != nullptr; k += 32) {
      reinterpret_cast<float*>(row + s.topk_weights)[k] =
          n < p.c_rows ? *reinterpret_cast<const float*>(p.cw + n * p.cw_st + k * p.cw_sk) : 0.0f;
    }
  }
}

// One warp per token. The warp first lists the token's sources in rank order (shared memory);
// then each lane takes 8 channels at a time and issues the loads of a whole batch of sources
// before adding them, in rank order, so the reduction keeps the host backend's order while
// many loads are in flight.
// kNodePart: the hierarchical reduction across nodes (core/internode.h), for the tokens that stay
// on this rank's node: the ranks' rows summed from zero and rounded, then added to the biases and
// rounded again, as home folds its own node's part.
template <bool kNodePart>
__device__ __forceinline__ void reduce_tokens(const CombineArgs& a) {
  SY_SHARED(const uint8_t* [kWarpsPerBlock][kMaxSources], row_of);  // compact: the row; expanded: null
  SY_SHARED(int32_t[kWarpsPerBlock][kMaxSources], source_of);
  SY_SHARED(int64_t[kWarpsPerBlock][kMaxSources], index_of);  // the row's index in the source's receive order
  SY_SHARED(int, go);  // one answer per block: warp-wide votes follow
  if (threadIdx.x == 0) go = !op_failed(a.sync.report) && *a.ws.passed_barrier == 1;
  __syncthreads();
  if (!go) return;
  const int R = a.sync.ranks;
  const int me = a.sync.rank;
  const int lane = threadIdx.x % 32;
  const int w = threadIdx.x / 32;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int groups = a.hidden / 8;
  const int P = a.net.ranks_per_node, my_node = a.net.relay != nullptr ? core::node_of(me, P) : 0;
  for (int64_t t = warp; t < a.tokens; t += warps) {
    const int32_t* slots = a.h_slot + t * R;
    if (a.net.relay != nullptr) {
      // Two hops: a token that visits another node takes the network kernel (combine_network.cu).
      bool away = false;
      for (int p = lane; p < R; p += 32) away = away || (slots[p] >= 0 && core::node_of(p, P) != my_node);
      if (__any_sync(0xffffffffu, away)) continue;
    }
    int count = 0;
    for (int p0 = 0; p0 < R; p0 += 32) {
      const int p = p0 + lane;
      bool has = false;
      const uint8_t* row = nullptr;
      int64_t n = 0;
      const int32_t slot = p < R ? slots[p] : -1;
      if (slot >= 0) {
        // Rank p received our rows after those of the ranks below us.
        n = core::compact_row([&](int i) { return a.h_prefix[int64_t(i) * R + p]; }, me, slot);
        const Published& src = published(a, p);
        const int64_t bound = received_bound(src);
        if (n < bound) {
          has = true;
          if (src.expanded_k == 0) row = src.cx + n * src.cx_stride;
        } else {
          mismatch(a, p, n, bound);
        }
      }
      const unsigned mask = __ballot_sync(0xffffffffu, has);
      if (has) {
        const int at = count + __popc(mask & ((1u << lane) - 1u));
        row_of[w][at] = row;
        source_of[w][at] = p;
        index_of[w][at] = n;
      }
      count += __popc(mask);
    }
    __syncwarp();
    for (int g = lane; g < groups; g += 32) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // kNodePart: the node's part, from zero
      float v[8];
      if (a.bias0 != nullptr) {
        load_bf16x8(a.bias0 + t * a.bias0_stride + g * 16, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += v[i];
      }
      if (a.bias1 != nullptr) {
        load_bf16x8(a.bias1 + t * a.bias1_stride + g * 16, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += v[i];
      }
      for (int i0 = 0; i0 < count; i0 += kSourceBatch) {
        int4 raw[kSourceBatch];
#pragma unroll
        for (int j = 0; j < kSourceBatch; ++j) {
          const uint8_t* row = i0 + j < count ? row_of[w][i0 + j] : nullptr;
          if (row != nullptr) raw[j] = load_raw16(row + g * 16);
        }
#pragma unroll
        for (int j = 0; j < kSourceBatch; ++j) {
          if (i0 + j >= count) break;
          if (row_of[w][i0 + j] != nullptr) {
            unpack_bf16x8(raw[j], v);
          } else {
            expanded_part(published(a, source_of[w][i0 + j]), index_of[w][i0 + j], g, v);
          }
#pragma unroll
          for (int i = 0; i < 8; ++i) (kNodePart ? part[i] : acc[i]) += v[i];
        }
      }
      if (kNodePart && count > 0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += core::bf16_to_float(core::float_to_bf16(part[i]));
      }
      store_bf16x8(a.out + t * a.out_stride + g * 16, acc);
    }
    for (int k = lane; k < a.topk; k += 32) {
      float sum = 0.0f;
      for (int i = 0; i < count; ++i) add_contribution_weight(published(a, source_of[w][i]), index_of[w][i], k, sum);
      a.out_w[t * a.topk + k] = sum;
    }
    __syncwarp();  // the lists are rewritten for the next token
  }
}

__global__ void __launch_bounds__(kCopyThreads, 2) combine_reduce_kernel(CombineArgs a) { reduce_tokens<false>(a); }
__global__ void __launch_bounds__(kCopyThreads, 2) combine_reduce_node_parts_kernel(CombineArgs a) {
  reduce_tokens<true>(a);
}

}  // namespace

cudaError_t launch_combine(const CombineArgs& a, int blocks, cudaStream_t stream, bool* exchanged) {
  cudaError_t rc = cudaSuccess;
  if (a.stage.base != nullptr && a.stage.rows > 0) {
    const int64_t need = (a.stage.rows * 32 + kCopyThreads - 1) / kCopyThreads;
    SY_LAUNCH(stage_combine_kernel, int(need < blocks ? need : blocks), kCopyThreads, 0, stream)(a);
    rc = cudaGetLastError();
  }
  CombineArgs x = a;
  if (rc != cudaSuccess) x.desc[core::kDescRejected] = 1u;  // nothing valid to publish: the peers fail now
  SY_LAUNCH(combine_exchange_kernel, 1, kSyncThreads, 0, stream)(x);
  const cudaError_t launched = cudaGetLastError();
  *exchanged = launched == cudaSuccess;  // a rejection too: the peers count on its barrier
  if (rc == cudaSuccess) rc = launched;
  if (rc != cudaSuccess) return rc;
  int64_t need = (a.tokens * 32 + kCopyThreads - 1) / kCopyThreads;
  if (need < 1) need = 1;
  if (a.net.relay != nullptr) {
    // Two hops: the chain first (the peers wait for it), then what stays on this node.
    rc = launch_combine_network(a, stream);
    // The peers wait for this rank's chain: they hear at once that it will not come.
    if (rc != cudaSuccess) (void)launch_abandon(a.sync, -1, stream);
  }
  if (rc == cudaSuccess) {
    if (a.net.relay != nullptr && a.hierarchical) {
      SY_LAUNCH(combine_reduce_node_parts_kernel, int(need < blocks ? need : blocks), kCopyThreads, 0, stream)(a);
    } else {
      SY_LAUNCH(combine_reduce_kernel, int(need < blocks ? need : blocks), kCopyThreads, 0, stream)(a);
    }
    rc = cudaGetLastError();
  }
  // The end handshake whatever happened to the reduction: the peers wait for it. (A failed
  // reduction leaves this rank's output unwritten; the call reports the launch error.)
  SY_LAUNCH(finish_kernel, 1, kSyncThreads, 0, stream)(a.sync, a.off_done, core::WaitRole::CombineNotify,
                                                      a.ws.passed_barrier, nullptr,
                                                      late_network_hop(a.net, core::WaitRole::CombineNetwork));
  const cudaError_t finished = cudaGetLastError();
  return rc != cudaSuccess ? rc : finished;
}

}  // namespace sy::cuda
