// Ordered ranking on the GPU: items 0..n-1 in order, each holding any subset of `keys` keys
// (each at most once). For every (item, key) held, its rank is the number of earlier items that
// hold the key. This is what fixes the deterministic row orders of normal mode: a token's slot
// towards a destination rank (sender order), a received row's place in its local expert's group
// (expanded layout). Three passes, each fully parallel: count per chunk of items, scan the
// chunk counts per key, assign in order within each chunk.
//
// A ranker supplies `entry_of(i, key)` (the entry of item i holding key, or -1; items past the
// live count answer -1), `put(i, key, entry, rank)`, `miss(i, key)`, and `skip()` (true when an
// earlier kernel of the operation failed: then nothing is written).
#pragma once

#include <cstdint>

#include "portable.cuh"

namespace sy::cuda {

inline constexpr int kRankChunk = 128;
inline constexpr int kRankScanThreads = 512;

__host__ __device__ inline int64_t rank_chunks(int64_t n) { return (n + kRankChunk - 1) / kRankChunk; }

// Calls fn(id, key, first item, end) for every (chunk, key) pair, id = chunk * keys + key, one
// thread each (grid-stride).
template <class Fn>
__device__ void for_each_chunk_key(int64_t n, int keys, Fn fn) {
  const int64_t total = rank_chunks(n) * keys;
  for (int64_t id = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; id < total; id += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = id / keys;
    fn(id, int(id % keys), c * kRankChunk, (c + 1) * kRankChunk < n ? (c + 1) * kRankChunk : n);
  }
}

// Whether the block skips its work: one thread asks (the failure flags live in mapped host
// memory, where every read crosses the bus), the block follows.
template <class Ranker>
__device__ bool block_skips(const Ranker& rk) {
  SY_SHARED(int, skip);
  if (threadIdx.x == 0) skip = rk.skip() ? 1 : 0;
  __syncthreads();
  return skip != 0;
}

// counts[c * keys + key] = items of chunk c holding key.
template <class Ranker>
__global__ void rank_count_kernel(Ranker rk, int64_t n, int keys, int32_t* counts) {
  if (block_skips(rk)) return;
  for_each_chunk_key(n, keys, [&](int64_t id, int key, int64_t begin, int64_t end) {
    int32_t count = 0;
    for (int64_t i = begin; i < end; ++i) count += rk.entry_of(i, key) >= 0 ? 1 : 0;
    counts[id] = count;
  });
}

// One block per key: counts become exclusive prefixes over the chunks; totals[key] = all items.
__global__ void __launch_bounds__(kRankScanThreads) rank_scan_kernel(int64_t chunks, int keys, int32_t* counts,
                                                                     int32_t* totals);

// Ranks within each chunk, starting from the chunk's prefix.
template <class Ranker>
__global__ void rank_assign_kernel(Ranker rk, int64_t n, int keys, const int32_t* prefix) {
  if (block_skips(rk)) return;
  for_each_chunk_key(n, keys, [&](int64_t id, int key, int64_t begin, int64_t end) {
    int32_t rank = prefix[id];
    for (int64_t i = begin; i < end; ++i) {
      const int entry = rk.entry_of(i, key);
      if (entry >= 0) {
        rk.put(i, key, entry, rank++);
      } else {
        rk.miss(i, key);
      }
    }
  });
}

// The three passes on `stream`. `counts` holds rank_chunks(n) * keys ints, `totals` keys ints.
template <class Ranker>
cudaError_t launch_ordered_rank(const Ranker& rk, int64_t n, int keys, int32_t* counts, int32_t* totals, int max_blocks,
                                cudaStream_t stream) {
  if (keys <= 0) return cudaSuccess;
  // No items: every key's total is 0 (the totals of an earlier ordering must not linger).
  if (n <= 0) return cudaMemsetAsync(totals, 0, sizeof(int32_t) * size_t(keys), stream);
  const int64_t work = rank_chunks(n) * keys;
  const int threads = 256;
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks > max_blocks) blocks = max_blocks;
  SY_LAUNCH(rank_count_kernel, int(blocks), threads, 0, stream)(rk, n, keys, counts);
  SY_LAUNCH(rank_scan_kernel, keys, kRankScanThreads, 0, stream)(rank_chunks(n), keys, counts, totals);
  SY_LAUNCH(rank_assign_kernel, int(blocks), threads, 0, stream)(rk, n, keys, counts);
  return cudaGetLastError();
}

}  // namespace sy::cuda
