// The CUDA backend's low-latency mode: one call's device state, its arguments, the launches of
// the kernels in ll_kernels.h, and the errors their reports turn into.
#pragma once

#include <memory>

#include "cuda_objects.h"

namespace sy::cuda {

// The send phase (dispatch or combine) of call `work` on `stream`; then its receive phase, on
// the stream its hook or the call chose.
Error ll_send(BufferCore& buf, CudaStream& stream, const std::shared_ptr<LLWork>& work, bool dispatch);
Error ll_receive(BufferCore& buf, CudaStream& stream, const std::shared_ptr<LLWork>& work, bool dispatch);
// A call refused on this rank before its send (Backend::ll_reject).
Error ll_reject(BufferCore& buf, CudaStream& stream, const std::shared_ptr<LLWork>& work, bool dispatch);
// cleanLowLatencyBuffer at operation `epoch` (and epoch + 1); `status` learns how it went.
Error ll_clean(BufferCore& buf, CudaStream& stream, uint32_t epoch, const std::shared_ptr<OpStatus>& status);

}  // namespace sy::cuda
