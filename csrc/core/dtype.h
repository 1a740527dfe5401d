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
// (smallest 2^-9) and maps NaN to 0x7f.
SY_HD uint8_t float_to_fp8e4m3(float f) {
  uint32_t u = float_bits(f);
  uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return 0x7f;              // NaN
  if (mag >= 0x43e00000u) return sign | 0x7eu;     // >= 448 (and inf): saturate
  float a = bits_float(mag);
  if (a < 0.015625f) {                             // below 2^-6: subnormal, unit 2^-9
    // a * 512 is exact in float; round the quotient to nearest even.
    float q = a * 512.0f;
    uint32_t n = static_cast<uint32_t>(q);
    float frac = q - static_cast<float>(n);
    if (frac > 0.5f || (frac == 0.5f && (n & 1u))) n += 1;
    return sign | static_cast<uint8_t>(n);         // n == 8 is the smallest normal: same bits
  }
  // Normal: keep 3 mantissa bits of the float's 23, rounding to nearest even.
  uint32_t exp = (mag >> 23) - 127 + 7;            // 1..15
  uint32_t man = mag & 0x7fffffu;
  uint32_t keep = man >> 20;
  uint32_t rest = man & 0xfffffu;
  if (rest > 0x80000u || (rest == 0x80000u && (keep & 1u))) keep += 1;
  if (keep == 8) {
    keep = 0;
    exp += 1;
  }
  uint32_t code = (exp << 3) | keep;
  if (code > 0x7eu) code = 0x7eu;                  // rounding up past 448 saturates
  return sign | static_cast<uint8_t>(code);
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
