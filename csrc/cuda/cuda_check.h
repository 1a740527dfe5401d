// CUDA runtime errors as Switchyard errors.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "../abi/error.h"

namespace sy::cuda {

inline Error cuda_error(cudaError_t rc, const char* what) {
  if (rc == cudaSuccess) return ok();
  sy_status st = (rc == cudaErrorNoDevice || rc == cudaErrorInsufficientDriver)
                     ? SY_ERROR_NO_DEVICE
                     : (rc == cudaErrorMemoryAllocation ? SY_ERROR_OUT_OF_MEMORY : SY_ERROR_CUDA);
  return fail(st, std::string(what) + ": " + cudaGetErrorName(rc) + " (" + cudaGetErrorString(rc) + ")");
}

#define SY_CUDA(call) SY_TRY(::sy::cuda::cuda_error((call), #call))

}  // namespace sy::cuda
