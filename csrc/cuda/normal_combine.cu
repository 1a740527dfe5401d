// Normal-mode combine: every rank pulls, for each of its tokens, the expert outputs of the
// ranks that received it, straight from their combine inputs, and reduces them in registers in
// the order core/reduce.h fixes (biases, then source ranks in order; the expanded layout first
// sums a rank's rows of the token and rounds that to BF16, as the host backend does).
#include <cstdint>

#include "normal_kernels.h"
#include "row_copy.cuh"

namespace sy::cuda {

namespace {

__device__ __forceinline__ const Published& published(const CombineArgs& a, int owner) {
  return *reinterpret_cast<const Published*>(a.xchg[owner] + a.xl.off_pub);
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
  __shared__ uint32_t desc[core::kDescWords];
  if (threadIdx.x == 0) {
    *a.ws.passed_barrier = 0;
    for (int i = 0; i < core::kDescWords; ++i) desc[i] = a.desc[i];
    *reinterpret_cast<Published*>(a.xchg[a.sync.rank] + a.xl.off_pub) = a.pub;
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

// One warp per token: 8 channels per lane and step, every source's row read once.
__global__ void __launch_bounds__(kCopyThreads) combine_reduce_kernel(CombineArgs a) {
  if (op_failed(a.sync.report) || *a.ws.passed_barrier != 1) return;
  const int R = a.sync.ranks;
  const int me = a.sync.rank;
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int groups = a.hidden / 8;
  for (int64_t t = warp; t < a.tokens; t += warps) {
    const int32_t* slots = a.h_slot + t * R;
    for (int g = lane; g < groups; g += 32) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
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
      for (int p = 0; p < R; ++p) {
        const int32_t slot = slots[p];
        if (slot < 0) continue;
        // Rank p received our rows after those of the ranks below us.
        const int64_t n = (me == 0 ? 0 : a.h_prefix[int64_t(me - 1) * R + p]) + slot;
        const Published& src = published(a, p);
        if (src.expanded_k == 0) {  // p dispatched with the compact layout: one row per token
          if (n >= src.c_rows) {
            mismatch(a, p, n, src.c_rows);
            continue;
          }
          load_bf16x8(src.cx + n * src.cx_stride + g * 16, v);
        } else {
          if (n >= src.c_tokens) {
            mismatch(a, p, n, src.c_tokens);
            continue;
          }
          float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          for (int k = 0; k < src.expanded_k; ++k) {
            const int32_t row = src.expanded_row[n * src.expanded_k + k];
            if (row < 0 || row >= src.c_rows) continue;
            load_bf16x8(src.cx + row * src.cx_stride + g * 16, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) part[i] += v[i];
          }
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = core::bf16_to_float(core::float_to_bf16(part[i]));
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += v[i];
      }
      store_bf16x8(a.out + t * a.out_stride + g * 16, acc);
    }
    for (int k = lane; k < a.topk; k += 32) {
      float w = 0.0f;
      for (int p = 0; p < R; ++p) {
        const int32_t slot = slots[p];
        if (slot < 0) continue;
        const int64_t n = (me == 0 ? 0 : a.h_prefix[int64_t(me - 1) * R + p]) + slot;
        const Published& src = published(a, p);
        if (src.cw == nullptr || n >= src.c_rows) continue;  // mismatches are reported above
        w += *reinterpret_cast<const float*>(src.cw + n * src.cw_st + k * src.cw_sk);
      }
      a.out_w[t * a.topk + k] = w;
    }
  }
}

}  // namespace

cudaError_t launch_combine(const CombineArgs& a, int blocks, cudaStream_t stream) {
  combine_exchange_kernel<<<1, kSyncThreads, 0, stream>>>(a);
  int64_t need = (a.tokens * 32 + kCopyThreads - 1) / kCopyThreads;
  if (need < 1) need = 1;
  combine_reduce_kernel<<<int(need < blocks ? need : blocks), kCopyThreads, 0, stream>>>(a);
  finish_kernel<<<1, kSyncThreads, 0, stream>>>(a.sync, a.off_done, core::WaitRole::CombineNotify, a.ws.passed_barrier,
                                                nullptr);
  return cudaGetLastError();
}

}  // namespace sy::cuda
