// The layout kernel: per-rank and per-expert token counts and the token-in-rank matrix.
#pragma once

#include <cuda_runtime.h>

#include "../abi/objects.h"
#include "../core/failure.h"

namespace sy::cuda {

// Enqueues the kernel on `stream`. Bad top-k entries are recorded in `problem` (device-visible).
Error launch_layout(cudaStream_t stream, const LayoutWork& work, core::InputProblem* problem);

}  // namespace sy::cuda
