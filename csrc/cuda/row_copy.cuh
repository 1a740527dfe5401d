// Row copies for one warp: 16-byte vector accesses (every payload row is 16-byte aligned and a
// multiple of 16 bytes: the C ABI refuses other strides), byte accesses otherwise. Several loads
// are in flight per lane before the first store, which is what keeps NVLink and HBM busy.
#pragma once

#include <cstdint>

#include "../core/dtype.h"

namespace sy::cuda {

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Copies `bytes` from src to every non-null dst_of(d), d < ndst (the expanded layout writes one
// received row into several expert groups: it is read once). Warp-wide; dst_of must give every
// lane the same answers.
template <class DstOf>
__device__ inline void warp_copy_row(const uint8_t* src, DstOf dst_of, int ndst, int64_t bytes, int lane) {
  bool vec = aligned16(src) && (bytes & 15) == 0;
  for (int d = 0; d < ndst; ++d) vec = vec && (dst_of(d) == nullptr || aligned16(dst_of(d)));
  if (vec) {
    constexpr int kUnroll = 4;
    const int64_t n = bytes / 16;
    const auto* s = reinterpret_cast<const int4*>(src);
    int64_t i = lane;
    for (; i + 32 * (kUnroll - 1) < n; i += 32 * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(s + i + 32 * u);
      for (int d = 0; d < ndst; ++d) {
        auto* o = reinterpret_cast<int4*>(dst_of(d));
        if (o == nullptr) continue;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) o[i + 32 * u] = v[u];
      }
    }
    for (; i < n; i += 32) {
      const int4 v = __ldg(s + i);
      for (int d = 0; d < ndst; ++d) {
        auto* o = reinterpret_cast<int4*>(dst_of(d));
        if (o != nullptr) o[i] = v;
      }
    }
    return;
  }
  // Bytes: unreachable through the C ABI, which admits only 16-byte aligned rows of a
  // multiple of 16 bytes (validate.cpp, plan.cpp); kept so a wrong caller is slow, not wrong.
  for (int64_t i = lane; i < bytes; i += 32) {
    const uint8_t v = src[i];
    for (int d = 0; d < ndst; ++d) {
      uint8_t* o = dst_of(d);
      if (o != nullptr) o[i] = v;
    }
  }
}

// Zeroes `bytes` at `dst`. Warp-wide; 16-byte stores when `dst` and `bytes` allow.
__device__ inline void zero_row(uint8_t* dst, int64_t bytes, int lane) {
  if (aligned16(dst) && (bytes & 15) == 0) {
    for (int64_t i = lane; i < bytes / 16; i += 32) reinterpret_cast<int4*>(dst)[i] = make_int4(0, 0, 0, 0);
    return;
  }
  for (int64_t i = lane; i < bytes; i += 32) dst[i] = 0;
}

// 16 bytes at `p` (2-byte aligned): one vector load when 16-byte aligned.
__device__ __forceinline__ int4 load_raw16(const uint8_t* p) {
  if (aligned16(p)) return __ldg(reinterpret_cast<const int4*>(p));
  const auto* h = reinterpret_cast<const uint16_t*>(p);
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = uint32_t(h[2 * i]) | (uint32_t(h[2 * i + 1]) << 16);
  return make_int4(int(w[0]), int(w[1]), int(w[2]), int(w[3]));
}

// Eight BF16 channels as floats.
__device__ __forceinline__ void unpack_bf16x8(int4 v, float out[8]) {
  const uint32_t w[4] = {uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = core::bf16_to_float(uint16_t(w[i] & 0xffffu));
    out[2 * i + 1] = core::bf16_to_float(uint16_t(w[i] >> 16));
  }
}

// Eight BF16 channels at `p` as floats.
__device__ __forceinline__ void load_bf16x8(const uint8_t* p, float out[8]) { unpack_bf16x8(load_raw16(p), out); }

// 16 bytes to `p` (2-byte aligned): one vector store when 16-byte aligned.
__device__ __forceinline__ void store_raw16(uint8_t* p, int4 v) {
  if (aligned16(p)) {
    *reinterpret_cast<int4*>(p) = v;
    return;
  }
  const uint32_t w[4] = {uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w)};
  auto* h = reinterpret_cast<uint16_t*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    h[2 * i] = uint16_t(w[i] & 0xffffu);
    h[2 * i + 1] = uint16_t(w[i] >> 16);
  }
}

__device__ __forceinline__ void store_bf16x8(uint8_t* p, const float in[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = uint32_t(core::float_to_bf16(in[2 * i])) | (uint32_t(core::float_to_bf16(in[2 * i + 1])) << 16);
  }
  store_raw16(p, make_int4(int(w[0]), int(w[1]), int(w[2]), int(w[3])));
}

}  // namespace sy::cuda
