// LogFMT-10: the optional compression of low-latency combine rows, per block of 128 channels.
//
// A BF16 value's magnitude bits (exponent and mantissa, 15 bits) grow like a piecewise-linear
// log2 of the value with 7 fractional bits, so integer arithmetic on them is a log-domain
// quantiser that every backend (and a test in any language) computes bit for bit:
//
//   m_c      = bf16_c & 0x7fff, sign_c = bf16_c >> 15
//   fallback when the block's largest magnitude is not below 1.0 (m_max >= 0x3f80, which also
//            catches inf and NaN): the block travels as BF16 (DeepEP's rule: LogFMT only when
//            the block's log-max < 0)
//   otherwise m_min = smallest non-zero m_c, but at least m_max - 2048 (16 binades below the
//            block's largest value: one tiny value must not coarsen the whole block)
//            (all zero: m_min = 0)
//            step  = max(1, ceil((m_max - m_min) / 510))
//            q_c   = 0 for m_c < m_min (zero, or more than 16 binades below the maximum),
//                    else 1 + floor((m_c - m_min + step / 2) / step), at most 511
//            code  = sign_c << 9 | q_c (10 bits), packed little-endian at bit 10 * c
//   decode   m'_c = 0 for q_c == 0, else m_min + (q_c - 1) * step; bf16 = sign << 15 | m'_c
//
// A block spanning at most 510 magnitude steps (about four binades) is exact; wider blocks lose
// at most step / 2 units of the 7-bit mantissa (step <= 5: under 2% relative) per value, and
// values more than 2^16 times smaller than the block's largest become zero. Metadata per block (4 bytes): m_min (u16) and
// step (u16); step 0 marks a BF16 fallback block.
#pragma once

#include <cstdint>

#include "hd.h"
#include "limits.h"

namespace sy::core {

inline constexpr int kLogfmtBlockBytes = kScaleBlock * 10 / 8;  // 160
inline constexpr uint16_t kLogfmtOne = 0x3f80;                  // BF16 magnitude bits of 1.0
inline constexpr uint16_t kLogfmtSpan = 16 * 128;                // 16 binades of magnitude bits

struct LogfmtMeta {
  uint16_t m_min;
  uint16_t step;  // 0 = BF16 fallback
};

// The block's metadata from its largest magnitude and its smallest non-zero one (0xffff when
// every channel is zero): what a loop over the block (logfmt_plan) or a reduction across the
// threads that hold it computes.
SY_HD LogfmtMeta logfmt_plan_from(uint16_t m_max, uint16_t m_min) {
  LogfmtMeta meta;
  if (m_max >= kLogfmtOne) {
    meta.m_min = 0;
    meta.step = 0;
    return meta;
  }
  if (m_max == 0) m_min = 0;
  if (m_max > kLogfmtSpan && m_min < m_max - kLogfmtSpan) m_min = uint16_t(m_max - kLogfmtSpan);
  uint32_t span = uint32_t(m_max) - (m_max == 0 ? 0u : uint32_t(m_min));
  uint32_t step = (span + 509) / 510;
  meta.m_min = m_max == 0 ? 0 : m_min;
  meta.step = uint16_t(step < 1 ? 1 : step);
  return meta;
}

SY_HD LogfmtMeta logfmt_plan(const uint16_t* x, int n) {
  uint16_t m_max = 0, m_min = 0xffff;
  for (int i = 0; i < n; ++i) {
    uint16_t m = x[i] & 0x7fffu;
    if (m > m_max) m_max = m;
    if (m != 0 && m < m_min) m_min = m;
  }
  return logfmt_plan_from(m_max, m_min);
}

SY_HD uint16_t logfmt_code(uint16_t x, LogfmtMeta meta) {
  uint16_t m = x & 0x7fffu;
  uint32_t q = 0;
  if (m != 0 && m >= meta.m_min) {
    q = 1 + (uint32_t(m) - meta.m_min + meta.step / 2) / meta.step;
    if (q > 511) q = 511;
  }
  return uint16_t(((x >> 15) << 9) | q);
}

SY_HD uint16_t logfmt_decode(uint16_t code, LogfmtMeta meta) {
  uint32_t q = code & 0x1ffu;
  uint32_t m = q == 0 ? 0 : meta.m_min + (q - 1) * meta.step;
  return uint16_t(((code >> 9) & 1u) << 15 | (m & 0x7fffu));
}

// Code i of a packed block starts at bit 10 * i; the shift within its first byte is 0, 2, 4 or
// 6, so every code lies within two bytes. The block must start zeroed.
SY_HD void logfmt_put(uint8_t* block, int i, uint16_t v) {
  int bit = 10 * i;
  int byte = bit >> 3, shift = bit & 7;
  uint32_t w = uint32_t(v & 0x3ffu) << shift;
  block[byte] = uint8_t(block[byte] | (w & 0xffu));
  block[byte + 1] = uint8_t(block[byte + 1] | ((w >> 8) & 0xffu));
}

// Codes 4j .. 4j + 3 of a block fill bytes 5j .. 5j + 4 exactly (40 bits): what logfmt_put
// writes for them, as one little-endian 40-bit value, so that threads can write disjoint bytes.
SY_HD uint64_t logfmt_pack4(uint16_t c0, uint16_t c1, uint16_t c2, uint16_t c3) {
  return uint64_t(c0 & 0x3ffu) | uint64_t(c1 & 0x3ffu) << 10 | uint64_t(c2 & 0x3ffu) << 20 |
         uint64_t(c3 & 0x3ffu) << 30;
}

SY_HD uint16_t logfmt_get(const uint8_t* block, int i) {
  int bit = 10 * i;
  int byte = bit >> 3, shift = bit & 7;
  uint32_t w = uint32_t(block[byte]) | uint32_t(block[byte + 1]) << 8;
  return uint16_t((w >> shift) & 0x3ffu);
}

}  // namespace sy::core
