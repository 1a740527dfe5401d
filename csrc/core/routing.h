// Routing math: which rank hosts an expert, which ranks a token goes to, how received rows are
// laid out. Shared by the host backend and the CUDA kernels.
#pragma once

#include <cstdint>

#include "hd.h"

namespace sy::core {

// Experts are split evenly and contiguously: rank r hosts [r * EL, (r + 1) * EL).
SY_HD int expert_owner(int64_t expert, int experts_per_rank) {
  return static_cast<int>(expert / experts_per_rank);
}

// Nodes are runs of consecutive ranks: node n is [n * ranks_per_node, (n + 1) * ranks_per_node)
// (virtual nodes, and process groups numbered node-major as torchrun numbers them).
SY_HD int node_of(int rank, int ranks_per_node) { return rank / ranks_per_node; }

// The local id of a global expert on `rank`, or -1 when another rank hosts it (or e < 0).
SY_HD int32_t local_expert(int64_t expert, int rank, int experts_per_rank) {
  if (expert < 0) return -1;
  int64_t local = expert - int64_t(rank) * experts_per_rank;
  return (local >= 0 && local < experts_per_rank) ? static_cast<int32_t>(local) : -1;
}

SY_HD int64_t align_count(int64_t n, int64_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

// What is wrong with one token's top-k row, if anything.
enum class TopkProblem : int32_t { None = 0, OutOfRange = 1, Duplicate = 2 };

// Checks one row of top-k ids: each must be -1 or in [0, experts), and no expert may appear
// twice (a token visits an expert once). `at(k)` returns entry k. Sets *bad_k on failure.
template <class At>
SY_HD TopkProblem check_topk_row(At at, int topk, int64_t experts, int* bad_k) {
  for (int k = 0; k < topk; ++k) {
    int64_t e = at(k);
    if (e == -1) continue;
    if (e < 0 || e >= experts) {
      *bad_k = k;
      return TopkProblem::OutOfRange;
    }
    for (int j = 0; j < k; ++j) {
      if (at(j) == e) {
        *bad_k = k;
        return TopkProblem::Duplicate;
      }
    }
  }
  return TopkProblem::None;
}

// Rows of the expanded layout: each local expert's received rows, rounded up to `alignment`,
// one group after the other. `base` (optional, n entries) receives each group's first row.
SY_HD int64_t expanded_rows(const int32_t* counts, int n, int64_t alignment, int64_t* base) {
  int64_t rows = 0;
  for (int e = 0; e < n; ++e) {
    if (base) base[e] = rows;
    rows += align_count(counts[e], alignment);
  }
  return rows;
}

// The padding rows of the expanded layout, numbered group by group: prefix[e] (n + 1 entries)
// is the number of padding rows of the groups before e; returns them all.
SY_HD int64_t padding_rows(const int32_t* counts, int n, int64_t alignment, int64_t* prefix) {
  int64_t pads = 0;
  for (int e = 0; e < n; ++e) {
    prefix[e] = pads;
    pads += align_count(counts[e], alignment) - counts[e];
  }
  prefix[n] = pads;
  return pads;
}

// The row of padding row `i` (< prefix[n]): in the last group whose padding starts at or
// before i, after its received rows. `base` is expanded_rows' group starts.
SY_HD int64_t padding_row(const int64_t* prefix, const int64_t* base, const int32_t* counts, int n, int64_t i) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return base[lo] + counts[lo] + (i - prefix[lo]);
}

// Receive order in normal mode: by source rank, then by the sender's token order. The row of
// slot `slot` from `src` is the number of rows all lower ranks sent plus the slot.
// `rank_prefix_col(src)` is the inclusive prefix (rows from ranks 0..src) for this rank.
template <class PrefixAt>
SY_HD int64_t compact_row(PrefixAt rank_prefix_col, int src, int64_t slot) {
  return (src == 0 ? 0 : rank_prefix_col(src - 1)) + slot;
}

// Rows rank `src` sent to the rank whose prefix column this is.
template <class PrefixAt>
SY_HD int64_t rows_from(PrefixAt rank_prefix_col, int src) {
  return rank_prefix_col(src) - (src == 0 ? 0 : rank_prefix_col(src - 1));
}

}  // namespace sy::core
