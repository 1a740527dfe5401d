// Element types and the conversions both backends must perform bit-identically.
#pragma once

#include <cstdint>
#include <cstring>

#include "hd.h"

namespace sy::core {

// Values match sy_dtype in switchyard.h.
enum class DType : int32_t { Invalid = 0, BF16 = 1, FP8E4M3 = 2, F32 = 3, I32 = 4, I64 = 5, Bool = 6 };

SY_HD int dtype_size(DType t) {
  switch (t) {
    case DType::BF16: return 2;
    case DType::FP8E4M3: return 1;
    case DType::F32: return 4;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::Bool: return 1;
    default: return 0;
  }
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::BF16: return "bf16";
    case DType::FP8E4M3: return "fp8_e4m3";
    case DType::F32: return "f32";
    case DType::I32: return "i32";
    case DType::I64: return "i64";
    case DType::Bool: return "bool";
    default: return "invalid";
  }
}

SY_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

SY_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// BF16 is the top half of an IEEE float. Rounding is to nearest, ties to even; NaN stays NaN
// (quieted) so a NaN never rounds into infinity.
SY_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;
  return static_cast<uint16_t>(u >> 16);
}

SY_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// FP8 E4M3 (the "fn" variant: no infinities, 0x7f/0xff are NaN, max finite 448).
// Encoding saturates finite values beyond 448 to +-448, rounds to nearest even, keeps subnormals
// (smallest 2^-9) and maps NaN to 0x7f. Written without data-dependent loops or divisions, so a
// host loop over a block vectorises (the host backend quantises every low-latency token with it).
SY_HD uint8_t float_to_fp8e4m3(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return 0x7f;           // NaN
  if (mag >= 0x43e00000u) return sign | 0x7eu;  // >= 448 (and inf): saturate
  if (mag < 0x3c800000u) {                      // below 2^-6: subnormal, unit 2^-9
    // |f| * 512 < 8 is exact (so a fused multiply-add gives the same), and adding 2^23 rounds
    // it to an integer, nearest even, in the low mantissa bits. 8 is the smallest normal's code.
    const float biased = bits_float(mag) * 512.0f + 8388608.0f;
    return sign | static_cast<uint8_t>(float_bits(biased) - 0x4b000000u);
  }
  // Normal: keep 3 of the float's 23 mantissa bits, nearest even (a carry out of the mantissa
  // steps the exponent, as it should), then rebias the exponent from 127 to 7. Values below 448
  // round to at most 0x7e.
  const uint32_t rounded = (mag + 0x7ffffu + ((mag >> 20) & 1u)) >> 20;
  return sign | static_cast<uint8_t>(rounded - (120u << 3));
}

SY_HD float fp8e4m3_to_float(uint8_t v) {
  uint32_t sign = (v & 0x80u) ? 0x80000000u : 0u;
  uint32_t exp = (v >> 3) & 0xfu;
  uint32_t man = v & 0x7u;
  if (exp == 0xfu && man == 0x7u) return bits_float(sign | 0x7fc00000u);
  if (exp == 0) {
    float m = static_cast<float>(man) * 0.001953125f;  // man * 2^-9
    return sign ? -m : m;
  }
  return bits_float(sign | ((exp - 7 + 127) << 23) | (man << 20));
}

}  // namespace sy::core
