// The low-latency operations, independent of the backend: validation, call numbering and the
// double buffer's halves, outputs, stream placement, hooks, zero-copy views, the reset.
#pragma once

#include <memory>

#include "objects.h"

namespace sy {

struct LLDispatchRequest {
  std::shared_ptr<Tensor> x, topk_idx, expert_stats, wait_stats;
  std::shared_ptr<Stream> compute;
  uint32_t flags = 0;  // sy_ll_flags
};

struct LLDispatchOutputs {
  std::shared_ptr<Tensor> recv_x, recv_x_scales, recv_count;
  std::shared_ptr<LLHandle> handle;
  std::shared_ptr<Event> event;
  std::shared_ptr<Hook> hook;
  int num_local_experts = 0;
};

struct LLCombineRequest {
  std::shared_ptr<Tensor> x, topk_idx, topk_weights, out, wait_stats;
  std::shared_ptr<LLHandle> handle;
  std::shared_ptr<Stream> compute;
  uint32_t flags = 0;
};

struct LLCombineOutputs {
  std::shared_ptr<Tensor> combined_x;
  std::shared_ptr<Event> event;
  std::shared_ptr<Hook> hook;
};

Error op_ll_dispatch(std::shared_ptr<BufferCore> buf, const LLDispatchRequest& req, LLDispatchOutputs* out);
Error op_ll_combine(std::shared_ptr<BufferCore> buf, const LLCombineRequest& req, LLCombineOutputs* out);
// A low-latency call the binding refused before making it (sy_reject): told to the peers as
// the two calls above tell them of the arguments they refuse (peers_informed when done).
Error op_ll_refuse(std::shared_ptr<BufferCore> buf, bool dispatch, Error why);
// The send buffer of the next low-latency call, as a guarded [EL, R * Tmax, H] bf16 view.
Error op_ll_next_combine_buffer(BufferCore& buf, const LLHandle& handle, std::shared_ptr<Tensor>* out);
// The reset; `done` (optional) receives an event that reports its outcome.
Error op_ll_clean(BufferCore& buf, std::shared_ptr<Stream> compute, std::shared_ptr<Event>* done);
Error run_hook(Hook& hook);

}  // namespace sy
