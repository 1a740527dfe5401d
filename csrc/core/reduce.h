// The reduction order of combine. Float addition is not associative, so the order is part of
// the contract: the host backend and the CUDA kernels both follow it and agree bit for bit.
//
// Normal combine, per token t and channel c:
//   acc = 0.0f
//   acc += bias0[t][c]            (if given)
//   acc += bias1[t][c]            (if given)
//   for r = 0 .. R-1 (ascending): if t was sent to r: acc += row_from_r[c]
//   out[t][c] = bf16(acc)         (round to nearest even, once)
// Top-k weights: w[t][k] = sum over the same ranks, ascending, of the returned weights.
//
// Expanded layout: before sending, the receiving rank reduces the rows of each received token
// over its top-k entries in top-k order (acc = 0.0f; acc += row_k[c]) and rounds once to BF16;
// the reduced row then enters the normal combine above.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "hd.h"

namespace sy::core {

// Accumulates BF16 channels in float in the order the caller adds them.
struct BF16Accumulator {
  float acc = 0.0f;
  SY_HD void add(uint16_t v) { acc += bf16_to_float(v); }
  SY_HD uint16_t result() const { return float_to_bf16(acc); }
};

}  // namespace sy::core
