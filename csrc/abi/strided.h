// Element-wise copies between a strided tensor's memory and dense row-major host memory.
#pragma once

#include <cstdint>
#include <cstring>

#include "objects.h"

namespace sy {

// Calls fn(dense_index, element_offset) for every element in row-major order.
template <class Fn>
void for_each_element(const Tensor& t, Fn fn) {
  const int64_t n = t.numel();
  if (n == 0) return;
  int64_t idx[SY_MAX_DIMS] = {};
  int64_t off = 0;
  for (int64_t i = 0; i < n; ++i) {
    fn(i, off);
    for (int d = t.ndim - 1; d >= 0; --d) {
      if (++idx[d] < t.shape[d]) {
        off += t.strides[d];
        break;
      }
      off -= t.strides[d] * (t.shape[d] - 1);
      idx[d] = 0;
    }
  }
}

// `base` points at element 0 of the tensor's data (host-visible copy).
inline void strided_to_dense(const Tensor& t, const uint8_t* base, uint8_t* dst) {
  if (t.numel() == 0) return;  // dst may be NULL (an empty array)
  const int es = t.element_size();
  if (t.is_dense()) {
    std::memcpy(dst, base, t.dense_bytes());
    return;
  }
  for_each_element(t, [&](int64_t i, int64_t off) { std::memcpy(dst + i * es, base + off * es, es); });
}

inline void dense_to_strided(const Tensor& t, const uint8_t* src, uint8_t* base) {
  if (t.numel() == 0) return;  // src may be NULL (an empty array)
  const int es = t.element_size();
  if (t.is_dense()) {
    std::memcpy(base, src, t.dense_bytes());
    return;
  }
  for_each_element(t, [&](int64_t i, int64_t off) { std::memcpy(base + off * es, src + i * es, es); });
}

// Elements a tensor's memory must span: 1 + the largest element offset (0 if empty).
inline int64_t span_elements(const Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = 0;
  for (int d = 0; d < t.ndim; ++d) last += (t.shape[d] - 1) * t.strides[d];
  return last + 1;
}

}  // namespace sy
