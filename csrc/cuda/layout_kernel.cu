// Layout on the GPU: one thread per token checks its top-k row (core/routing.h), counts it once
// per destination rank, once per destination node and once per expert, and marks its rows of
// is_token_in_rank and is_token_in_node. Counts gather in shared-memory histograms when they
// fit, so global atomics stay per block.
#include "layout_kernel.h"

#include "../core/routing.h"
#include "cuda_check.h"
#include "device_sync.cuh"

namespace sy::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxSharedCounters = 12 * 1024;  // 48 KiB of int32

template <class Idx>
__global__ void layout_kernel(const Idx* topk, int64_t stride_t, int64_t stride_k, int64_t tokens,
                              int topk_n, int experts, int ranks, int ranks_per_node, int32_t* per_rank,
                              int32_t* per_expert, int32_t* per_node, bool* in_rank, bool* in_node,
                              core::InputProblem* problem, bool shared_counts) {
  SY_DYNAMIC_SHARED(int32_t, counts);  // [experts], [ranks], then [nodes], when shared_counts
  const int experts_per_rank = experts / ranks;
  const int nodes = ranks / ranks_per_node;
  if (shared_counts) {
    for (int i = threadIdx.x; i < experts + ranks + nodes; i += blockDim.x) counts[i] = 0;
    __syncthreads();
  }
  int32_t* expert_count = shared_counts ? counts : per_expert;
  int32_t* rank_count = shared_counts ? counts + experts : per_rank;
  int32_t* node_count = shared_counts ? counts + experts + ranks : per_node;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < tokens;
       t += int64_t(gridDim.x) * blockDim.x) {
    auto at = [&](int k) { return int64_t(topk[t * stride_t + k * stride_k]); };
    int bad = -1;
    core::TopkProblem p = core::check_topk_row(at, topk_n, experts, &bad);
    if (p != core::TopkProblem::None) {
      note_problem(problem, t);
      continue;
    }
    for (int k = 0; k < topk_n; ++k) {
      int64_t e = at(k);
      if (e < 0) continue;
      atomicAdd(&expert_count[e], 1);
      const int owner = core::expert_owner(e, experts_per_rank);
      const int node = core::node_of(owner, ranks_per_node);
      bool rank_seen = false, node_seen = false;
      for (int j = 0; j < k && !rank_seen; ++j) {  // a rank seen means its node seen too
        int64_t ej = at(j);
        if (ej < 0) continue;
        const int owner_j = core::expert_owner(ej, experts_per_rank);
        rank_seen = owner_j == owner;
        node_seen = node_seen || core::node_of(owner_j, ranks_per_node) == node;
      }
      if (!rank_seen) {
        in_rank[t * ranks + owner] = true;
        atomicAdd(&rank_count[owner], 1);
      }
      if (!node_seen) {
        in_node[t * nodes + node] = true;
        atomicAdd(&node_count[node], 1);
      }
    }
  }
  if (shared_counts) {
    __syncthreads();
    for (int i = threadIdx.x; i < experts; i += blockDim.x)
      if (counts[i]) atomicAdd(&per_expert[i], counts[i]);
    for (int i = threadIdx.x; i < ranks; i += blockDim.x)
      if (counts[experts + i]) atomicAdd(&per_rank[i], counts[experts + i]);
    for (int i = threadIdx.x; i < nodes; i += blockDim.x)
      if (counts[experts + ranks + i]) atomicAdd(&per_node[i], counts[experts + ranks + i]);
  }
}

// The lowest bad token's full record (one thread, after the layout kernel).
template <class Idx>
__global__ void layout_problem_kernel(const Idx* topk, int64_t stride_t, int64_t stride_k, int topk_n, int experts,
                                      core::InputProblem* problem) {
  auto at = [&](int64_t t, int k) { return int64_t(topk[t * stride_t + k * stride_k]); };
  finish_problem(problem, at, topk_n, experts);
}

}  // namespace

Error launch_layout(cudaStream_t stream, const LayoutWork& w, core::InputProblem* problem) {
  const Tensor& topk = *w.topk_idx;
  auto* per_rank = reinterpret_cast<int32_t*>(w.num_tokens_per_rank->data());
  auto* per_expert = reinterpret_cast<int32_t*>(w.num_tokens_per_expert->data());
  auto* in_rank = reinterpret_cast<bool*>(w.is_token_in_rank->data());
  auto* per_node = reinterpret_cast<int32_t*>(w.num_tokens_per_node->data());
  auto* in_node = reinterpret_cast<bool*>(w.is_token_in_node->data());
  const int nodes = w.num_ranks / w.ranks_per_node;
  SY_CUDA(cudaMemsetAsync(per_rank, 0, sizeof(int32_t) * size_t(w.num_ranks), stream));
  SY_CUDA(cudaMemsetAsync(per_expert, 0, sizeof(int32_t) * size_t(w.num_experts), stream));
  SY_CUDA(cudaMemsetAsync(in_rank, 0, size_t(w.num_tokens) * size_t(w.num_ranks), stream));
  SY_CUDA(cudaMemsetAsync(per_node, 0, sizeof(int32_t) * size_t(nodes), stream));
  SY_CUDA(cudaMemsetAsync(in_node, 0, size_t(w.num_tokens) * size_t(nodes), stream));
  if (w.num_tokens == 0) return ok();
  const int counters = w.num_experts + w.num_ranks + nodes;
  const bool shared_counts = counters <= kMaxSharedCounters;
  const size_t smem = shared_counts ? sizeof(int32_t) * size_t(counters) : 0;
  const int64_t blocks64 = (w.num_tokens + kThreads - 1) / kThreads;
  const int blocks = int(blocks64 < 1024 ? blocks64 : 1024);
  if (topk.dtype == core::DType::I64) {
    SY_LAUNCH(layout_kernel<int64_t>, blocks, kThreads, smem, stream)(
        topk.at<int64_t>(0), topk.strides[0], topk.strides[1], w.num_tokens, w.topk, w.num_experts,
        w.num_ranks, w.ranks_per_node, per_rank, per_expert, per_node, in_rank, in_node, problem, shared_counts);
    SY_LAUNCH(layout_problem_kernel<int64_t>, 1, 1, 0, stream)(topk.at<int64_t>(0), topk.strides[0], topk.strides[1], w.topk,
                                                        w.num_experts, problem);
  } else {
    SY_LAUNCH(layout_kernel<int32_t>, blocks, kThreads, smem, stream)(
        topk.at<int32_t>(0), topk.strides[0], topk.strides[1], w.num_tokens, w.topk, w.num_experts,
        w.num_ranks, w.ranks_per_node, per_rank, per_expert, per_node, in_rank, in_node, problem, shared_counts);
    SY_LAUNCH(layout_problem_kernel<int32_t>, 1, 1, 0, stream)(topk.at<int32_t>(0), topk.strides[0], topk.strides[1], w.topk,
                                                        w.num_experts, problem);
  }
  return cuda_error(cudaGetLastError(), "layout kernel launch");
}

}  // namespace sy::cuda
