// Float arithmetic with the rounding pinned: every product and sum rounded to float32 on its
// own, never fused. The CUDA compiler contracts a*b+c into an FMA unless told otherwise, which
// would make the device disagree with the host in the last bit.
#pragma once

#include "hd.h"

namespace sy::core {

SY_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SY_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

SY_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

}  // namespace sy::core
