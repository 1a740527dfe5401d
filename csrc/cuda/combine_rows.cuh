// What a rank contributes to a combined token, read from the combine input it published: both
// the one-hop reduction (normal_combine.cu) and the chain across nodes (combine_network.cu) fold
// these, in the same order, so that their results agree bit for bit.
#pragma once

#include <cstdint>

#include "normal_kernels.h"
#include "row_copy.cuh"

namespace sy::cuda {

// Expanded layout at rank p: its rows of received token n summed in top-k order and rounded to
// BF16 (what the host backend sends back), for 8 channels of group g. Each row's load waits for
// its index: batching them (2 or 4 at a time) spills within the 64 registers that let two
// blocks share an SM (-Xptxas -v, sm_90), so the latency is hidden by the SM's 32 warps instead.
__device__ inline void expanded_part(const Published& src, int64_t n, int g, float out[8]) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float v[8];
  for (int k = 0; k < src.expanded_k; ++k) {
    const int32_t row = src.expanded_row[n * src.expanded_k + k];
    if (row < 0 || row >= src.c_rows) continue;
    load_bf16x8(src.cx + row * src.cx_stride + g * 16, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) part[i] += v[i];
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = core::bf16_to_float(core::float_to_bf16(part[i]));
}

// How many received tokens a publisher's combine input answers for: a row index at or past it
// means the ranks passed handles of different dispatches.
__device__ __forceinline__ int64_t received_bound(const Published& src) {
  return src.expanded_k == 0 ? src.c_rows : src.c_tokens;
}

// The publisher's contribution to its received token n, 8 channels of group g: its row, or in
// the expanded layout its rows summed and rounded.
__device__ __forceinline__ void contribution(const Published& src, int64_t n, int g, float v[8]) {
  if (src.expanded_k == 0) {
    load_bf16x8(src.cx + n * src.cx_stride + g * 16, v);
  } else {
    expanded_part(src, n, g, v);
  }
}

// Its top-k weight k for received token n, added to `sum` (nothing where it has none).
__device__ __forceinline__ void add_contribution_weight(const Published& src, int64_t n, int k, float& sum) {
  if (src.cw == nullptr || n >= src.c_rows) return;
  sum += *reinterpret_cast<const float*>(src.cw + n * src.cw_st + k * src.cw_sk);
}

}  // namespace sy::cuda
