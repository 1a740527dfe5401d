// The normal-mode operations, independent of the backend: argument validation, stream
// choreography, output allocation and the host side of exact-size dispatch. The backends supply
// the stages (objects.h: Backend).
#pragma once

#include <memory>

#include "objects.h"

namespace sy {

// The stream semantics every operation shares (switchyard.h).
struct StreamOrder {
  std::shared_ptr<Stream> compute;
  std::shared_ptr<Event> previous;
  bool async_finish = false;
  bool allocate_on_comm = false;
};

struct LayoutRequest {
  std::shared_ptr<Tensor> topk_idx;
  int num_experts = 0;
  StreamOrder order;
};

struct LayoutOutputs {
  std::shared_ptr<Tensor> num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank;
  std::shared_ptr<Tensor> num_tokens_per_node, is_token_in_node;
  std::shared_ptr<Event> event;
};

struct DispatchRequest {
  std::shared_ptr<Tensor> x, x_scales, topk_idx, topk_weights, is_token_in_rank;
  std::shared_ptr<DispatchHandle> cached;
  int num_experts = 0;
  int64_t num_worst_tokens = 0;
  int64_t timeout_ms = 0;
  int expert_alignment = 1;
  int layout = SY_LAYOUT_COMPACT;
  bool zero_padding = false;
  StreamOrder order;
};

struct DispatchOutputs {
  std::shared_ptr<Tensor> recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_count;
  std::shared_ptr<DispatchHandle> handle;
  std::shared_ptr<Event> event;
  int64_t num_recv_tokens = -1;
  int64_t num_rows = 0;
  int num_local_experts = 0;
};

struct CombineRequest {
  std::shared_ptr<Tensor> x, topk_weights, bias0, bias1, out;
  std::shared_ptr<DispatchHandle> handle;
  uint32_t internode_reduction = SY_INTERNODE_CHAIN;
  StreamOrder order;
};

struct CombineOutputs {
  std::shared_ptr<Tensor> combined_x, combined_topk_weights;
  std::shared_ptr<Event> event;
};

// The stream choreography shared by the operations (switchyard.h).
Error check_order(const StreamOrder& o, const BufferCore& buf);
// The communication stream waits for the previous event, or for the compute stream.
Error begin_on_comm(BufferCore& buf, const StreamOrder& o);
// With async_finish: an event after the work. Otherwise the compute stream waits for it.
Error end_on_comm(BufferCore& buf, const StreamOrder& o, std::shared_ptr<Event>* event,
                  std::shared_ptr<OpStatus> status);
// An optional tensor argument: on this rank, and not a stale view.
Error check_tensor_arg(const char* arg, const std::shared_ptr<Tensor>& t, const BufferCore& buf);
// The same for a tensor the operation writes: not read-only, not a view already sent.
Error check_output_arg(const char* arg, const std::shared_ptr<Tensor>& t, const BufferCore& buf);

Error op_layout(BufferCore& buf, const LayoutRequest& req, LayoutOutputs* out);
// A collective (dispatch or combine) refused on this rank before it was enqueued, for `why`:
// the peers are told at the barrier and fail within milliseconds naming this rank; returns
// `why`, marked peers_informed when they were.
Error refuse(BufferCore& buf, core::OpKind kind, Error why);
Error op_dispatch(BufferCore& buf, const DispatchRequest& req, DispatchOutputs* out);
Error op_combine(BufferCore& buf, const CombineRequest& req, CombineOutputs* out);

// A new tensor on `rank`, dense, zero-filled.
Error new_tensor(const std::shared_ptr<GroupCore>& group, int rank, core::DType dtype,
                 std::initializer_list<int64_t> shape, std::shared_ptr<Tensor>* out);
// A new dense tensor for an output of an operation of `buf`, allocated in the order of its
// communication stream and not initialised (Backend::allocate_output).
Error new_output(const BufferCore& buf, core::DType dtype, std::initializer_list<int64_t> shape,
                 std::shared_ptr<Tensor>* out, OutputWritten written = OutputWritten::Entirely);

}  // namespace sy
