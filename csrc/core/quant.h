// FP8 quantisation of the low-latency dispatch (done by the library, per token and per block of
// 128 channels), bit-exact on both backends:
//
//   amax      = max |x_c| over the block, NaN channels ignored
//   a         = max(amax, 1e-4)
//   plain     scale = 448 / a              scale_inv = a / 448
//   rounded   scale_inv = 2^ceil(log2(a / 448)) (exactly, from the float's bits)
//             scale = 1 / scale_inv (exact: a power of two)
//   q_c       = e4m3(x_c * scale)          saturating at +-448; NaN -> 0x7f
//   stored    scale_inv as f32, or with UE8M0 its biased exponent byte, block j in byte j % 4
//             of word j / 4 (so 4 blocks = 512 channels per int32)
//
// Dequantisation is q_c * scale_inv. Infinite inputs make amax infinite: scale 0, every channel
// of the block NaN (inf * 0) or 0, scale_inv inf. Both are defined, not recommended.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "fparith.h"
#include "hd.h"
#include "limits.h"

namespace sy::core {

inline constexpr float kFp8Max = 448.0f;
inline constexpr float kAmaxFloor = 1e-4f;

// The smallest power of two >= v, for finite v > 0 (inf and NaN are returned as they are).
SY_HD float pow2_ceil(float v) {
  uint32_t u = float_bits(v);
  uint32_t exp = (u >> 23) & 0xffu;
  if (exp == 0xffu) return v;
  if (exp == 0) {  // subnormal: the next power of two above its highest set bit
    uint32_t m = u & 0x7fffffu;
    if (m == 0) return v;
    uint32_t p = 1;
    while (p < m) p <<= 1;
    return p == 0x800000u ? bits_float(0x00800000u) : bits_float(p);
  }
  if ((u & 0x7fffffu) == 0) return v;
  return bits_float((exp + 1) << 23);  // may become inf past the largest power of two
}

struct BlockScale {
  float scale;      // multiply by this before encoding
  float scale_inv;  // multiply the code's value by this to dequantise
};

SY_HD BlockScale fp8_block_scale(float amax, bool round_scale) {
  float a = amax > kAmaxFloor ? amax : kAmaxFloor;  // NaN never reaches here (see amax)
  BlockScale s;
  if (round_scale) {
    s.scale_inv = pow2_ceil(div_rn(a, kFp8Max));
    s.scale = div_rn(1.0f, s.scale_inv);
  } else {
    s.scale = div_rn(kFp8Max, a);
    s.scale_inv = div_rn(a, kFp8Max);
  }
  return s;
}

// max |x| of n BF16 channels; NaN channels do not count.
SY_HD float bf16_block_amax(const uint16_t* x, int n) {
  float m = 0.0f;
  for (int i = 0; i < n; ++i) {
    float v = bf16_to_float(x[i]);
    v = v < 0 ? -v : v;
    if (v > m) m = v;  // false for NaN
  }
  return m;
}

SY_HD uint8_t fp8_quantize(uint16_t x, float scale) {
  return float_to_fp8e4m3(mul_rn(bf16_to_float(x), scale));
}

// The UE8M0 byte of a power-of-two scale: its biased exponent.
SY_HD uint8_t ue8m0_of(float pow2) { return uint8_t((float_bits(pow2) >> 23) & 0xffu); }

// Scale words per token: f32 per block, or UE8M0 packed 4 blocks per int32.
SY_HD int ll_scale_words(int hidden, bool ue8m0) {
  int blocks = hidden / kScaleBlock;
  return ue8m0 ? (blocks + 3) / 4 : blocks;
}

}  // namespace sy::core
