#include "ops.h"

#include <string>

#include "../core/limits.h"
#include "../core/routing.h"
#include "protocol_errors.h"
#include "validate.h"

namespace sy {

using core::DType;

namespace {

std::shared_ptr<Tensor> dense_tensor(const std::shared_ptr<GroupCore>& group, int rank, DType dtype,
                                     std::initializer_list<int64_t> shape) {
  auto t = std::make_shared<Tensor>();
  t->group = group;
  t->rank = rank;
  t->dtype = dtype;
  t->ndim = int(shape.size());
  int i = 0;
  for (int64_t d : shape) t->shape[i++] = d;
  dense_strides(t->ndim, t->shape, t->strides);
  return t;
}

}  // namespace

Error new_tensor(const std::shared_ptr<GroupCore>& group, int rank, DType dtype,
                 std::initializer_list<int64_t> shape, std::shared_ptr<Tensor>* out) {
  std::shared_ptr<Tensor> t = dense_tensor(group, rank, dtype, shape);
  SY_TRY(group->backend->allocate(*group->rank_by_index(rank), t->dense_bytes(), &t->memory));
  *out = std::move(t);
  return ok();
}

Error new_output(const BufferCore& buf, DType dtype, std::initializer_list<int64_t> shape,
                 std::shared_ptr<Tensor>* out, OutputWritten written) {
  std::shared_ptr<Tensor> t = dense_tensor(buf.group, buf.rank, dtype, shape);
  SY_TRY(buf.group->backend->allocate_output(*buf.group->rank_by_index(buf.rank), *buf.comm_stream,
                                             t->dense_bytes(), written, &t->memory));
  *out = std::move(t);
  return ok();
}

Error check_order(const StreamOrder& o, const BufferCore& buf) {
  if (!o.compute) return invalid("stream", "stream: a compute stream is required");
  if (o.compute->group.get() != buf.group.get() || o.compute->rank != buf.rank) {
    return fail(SY_ERROR_WRONG_HANDLE,
                "stream: the stream belongs to rank " + std::to_string(o.compute->rank) +
                    ", this buffer to rank " + std::to_string(buf.rank),
                "stream");
  }
  if (o.previous && (o.previous->group.get() != buf.group.get() || o.previous->rank != buf.rank)) {
    return fail(SY_ERROR_WRONG_HANDLE,
                "previousEvent: the event belongs to rank " + std::to_string(o.previous->rank) +
                    ", this buffer to rank " + std::to_string(buf.rank),
                "previousEvent");
  }
  if (o.allocate_on_comm && (!o.previous || !o.async_finish)) {
    return invalid("allocateOnCommStream",
                   "allocateOnCommStream: needs previousEvent and asyncFinish (the outputs then "
                   "belong to the communication stream until the returned event)");
  }
  return ok();
}

// The communication stream waits for the previous event, or for the compute stream.
Error begin_on_comm(BufferCore& buf, const StreamOrder& o) {
  if (o.previous) return buf.comm_stream->wait_event(*o.previous);
  std::shared_ptr<Event> ev;
  GroupCore& g = *buf.group;
  SY_TRY(g.backend->create_event(buf.group, buf.rank_core(), &ev, false));
  SY_TRY(ev->record(*o.compute));
  return buf.comm_stream->wait_event(*ev);
}

// With async_finish: an event after the work. Otherwise the compute stream waits for it.
Error end_on_comm(BufferCore& buf, const StreamOrder& o, std::shared_ptr<Event>* event,
                  std::shared_ptr<OpStatus> status) {
  std::shared_ptr<Event> ev;
  GroupCore& g = *buf.group;
  SY_TRY(g.backend->create_event(buf.group, buf.rank_core(), &ev, o.async_finish));  // the caller's then
  SY_TRY(ev->record(*buf.comm_stream, std::move(status)));
  if (o.async_finish) {
    *event = ev;
    return ok();
  }
  return o.compute->wait_event(*ev);
}

Error check_tensor_arg(const char* arg, const std::shared_ptr<Tensor>& t, const BufferCore& buf) {
  if (!t) return ok();
  SY_TRY(check_owner(arg, *t, buf.group.get(), buf.rank));
  return check_view(arg, *t);
}

Error check_output_arg(const char* arg, const std::shared_ptr<Tensor>& t, const BufferCore& buf) {
  if (!t) return ok();
  SY_TRY(check_owner(arg, *t, buf.group.get(), buf.rank));
  return check_writable(arg, *t);
}

namespace {

// Experts split evenly over the ranks, at most kMaxExpertsPerRank each.
Error check_num_experts(int64_t experts, int ranks) {
  SY_TRY(check_range("numExperts", experts, 1, int64_t(ranks) * core::kMaxExpertsPerRank));
  if (experts % ranks == 0) return ok();
  return invalid("numExperts", "numExperts: " + std::to_string(experts) +
                                   " experts cannot be split evenly over " + std::to_string(ranks) + " ranks");
}

// Top-k entries per token: 1..kMaxTopk (records reserve that many).
Error check_topk_width(const char* arg, int64_t k) {
  if (k >= 1 && k <= core::kMaxTopk) return ok();
  return invalid(arg, std::string(arg) + ": 1 to " + std::to_string(core::kMaxTopk) +
                          " experts per token are supported, got " + std::to_string(k));
}

Error check_handle(const DispatchHandle& h, const BufferCore& buf) {
  if (h.set != buf.set.get() || h.rank != buf.rank) {
    return fail(SY_ERROR_WRONG_HANDLE,
                "handle: the dispatch handle comes from another buffer (rank " +
                    std::to_string(h.rank) + "); pass the handle this buffer's dispatch returned",
                "handle");
  }
  return ok();
}

}  // namespace

Error op_layout(BufferCore& buf, const LayoutRequest& req, LayoutOutputs* out) {
  SY_TRY(check_order(req.order, buf));
  if (!req.topk_idx) return invalid("topkIdx", "topkIdx: required");
  const Tensor& topk = *req.topk_idx;
  SY_TRY(check_owner("topkIdx", topk, buf.group.get(), buf.rank));
  SY_TRY(check_dtype("topkIdx", topk, {DType::I64, DType::I32}));
  SY_TRY(check_shape("topkIdx", topk, {-1, -1}, "tokens, topk"));
  SY_TRY(check_topk_width("topkIdx", topk.shape[1]));
  const int R = buf.group->num_ranks;
  SY_TRY(check_num_experts(req.num_experts, R));
  auto w = std::make_shared<LayoutWork>();
  w->rank = buf.rank;
  w->num_ranks = R;
  w->num_experts = req.num_experts;
  w->num_tokens = topk.shape[0];
  w->topk = int(topk.shape[1]);
  w->topk_idx = req.topk_idx;
  const auto& g = buf.group;
  w->ranks_per_node = g->ranks_per_node;
  const int nodes = R / g->ranks_per_node;
  SY_TRY(new_output(buf, DType::I32, {R}, &w->num_tokens_per_rank));
  SY_TRY(new_output(buf, DType::I32, {req.num_experts}, &w->num_tokens_per_expert));
  SY_TRY(new_output(buf, DType::Bool, {w->num_tokens, R}, &w->is_token_in_rank));
  SY_TRY(new_output(buf, DType::I32, {nodes}, &w->num_tokens_per_node));
  SY_TRY(new_output(buf, DType::Bool, {w->num_tokens, nodes}, &w->is_token_in_node));

  for (auto* t : {&w->num_tokens_per_rank, &w->num_tokens_per_expert, &w->is_token_in_rank, &w->num_tokens_per_node,
                  &w->is_token_in_node}) {
    (*t)->producer = w->status;
  }
  // Local: no epoch, no peers, so no need to wait for an exact-size dispatch that holds the
  // buffer's enqueue lock while it waits for its counts.
  SY_TRY(begin_on_comm(buf, req.order));
  SY_TRY(g->backend->layout(*buf.comm_stream, w));
  SY_TRY(end_on_comm(buf, req.order, &out->event, w->status));
  out->num_tokens_per_rank = w->num_tokens_per_rank;
  out->num_tokens_per_expert = w->num_tokens_per_expert;
  out->is_token_in_rank = w->is_token_in_rank;
  out->num_tokens_per_node = w->num_tokens_per_node;
  out->is_token_in_node = w->is_token_in_node;
  return ok();
}

namespace {

Error validate_dispatch(const BufferCore& buf, const DispatchRequest& req, DispatchWork* w) {
  const int R = buf.group->num_ranks;
  const core::BufferPlan& plan = buf.plan;
  SY_TRY(check_order(req.order, buf));
  SY_TRY(check_tensor_arg("x", req.x, buf));
  SY_TRY(check_tensor_arg("xScales", req.x_scales, buf));
  SY_TRY(check_tensor_arg("topkIdx", req.topk_idx, buf));
  SY_TRY(check_tensor_arg("topkWeights", req.topk_weights, buf));
  SY_TRY(check_tensor_arg("isTokenInRank", req.is_token_in_rank, buf));
  if (req.cached) SY_TRY(check_handle(*req.cached, buf));

  if (!req.x) return invalid("x", "x: required");
  const Tensor& x = *req.x;
  SY_TRY(check_dtype("x", x, {DType::BF16, DType::FP8E4M3}));
  SY_TRY(check_shape("x", x, {-1, plan.hidden}, "tokens, hidden"));
  SY_TRY(check_rows_contiguous("x", x));
  const int64_t T = x.shape[0];
  if (T > plan.max_tokens_per_rank) {
    return invalid("x", "x: " + std::to_string(T) + " tokens exceed the buffer's maxTokensPerRank (" +
                            std::to_string(plan.max_tokens_per_rank) + ")");
  }
  const bool fp8 = x.dtype == DType::FP8E4M3;
  if (fp8 && plan.hidden % 16 != 0) {
    return invalid("x", "x: FP8 rows must be a multiple of 16 bytes; hidden " +
                            std::to_string(plan.hidden) + " is not a multiple of 16");
  }
  w->x_dtype = x.dtype;
  w->payload_bytes = plan.hidden * x.element_size();
  if (fp8) {
    if (!req.x_scales) return invalid("xScales", "xScales: required with an FP8 x (one scale per 128 channels)");
    const Tensor& s = *req.x_scales;
    SY_TRY(check_dtype("xScales", s, {DType::F32, DType::I32}));
    const int64_t cols = s.dtype == DType::F32 ? (plan.hidden + 127) / 128 : (plan.hidden + 511) / 512;
    SY_TRY(check_shape("xScales", s, {T, cols},
                       s.dtype == DType::F32 ? "tokens, hidden / 128 f32 scales"
                                             : "tokens, hidden / 512 packed UE8M0 words"));
    w->num_scales = int(cols);
    w->scale_dtype = s.dtype;
  } else if (req.x_scales) {
    return invalid("xScales", "xScales: only an FP8 x takes scales; x is bf16");
  }

  if (req.cached) {
    DispatchHandle& h = *req.cached;
    h.refresh();
    if (req.topk_idx || req.topk_weights) {
      return invalid(req.topk_idx ? "topkIdx" : "topkWeights",
                     std::string(req.topk_idx ? "topkIdx" : "topkWeights") +
                         ": a cached dispatch reuses the handle's routing; pass no top-k");
    }
    if (req.is_token_in_rank) {
      return invalid("isTokenInRank", "isTokenInRank: a cached dispatch reuses the handle's routing");
    }
    if (req.num_worst_tokens != 0) {
      return invalid("numWorstTokens", "numWorstTokens: a cached dispatch takes its size from the handle");
    }
    if (T != h.num_tokens) {
      return invalid("x", "x: the cached handle routes " + std::to_string(h.num_tokens) +
                              " tokens, x has " + std::to_string(T));
    }
    if (req.layout != h.layout) {
      return invalid("layout", std::string("layout: the handle was made with the ") +
                                   (h.layout == SY_LAYOUT_EXPANDED ? "expanded" : "compact") +
                                   " layout");
    }
    if (h.state.load() == 2) return invalid("handle", "handle: its dispatch failed, so it holds no routing");
    if (h.num_recv_tokens.load() < 0) {
      return invalid("handle", "handle: comes from a worst-case dispatch that has not completed; "
                               "synchronize before reusing it");
    }
    w->mode = DispatchMode::Cached;
    w->cached = true;
    w->num_experts = h.num_experts;
    w->num_local_experts = h.num_local_experts;
    w->topk = 0;
    w->topk_dtype = h.topk_dtype;
    w->expert_alignment = h.expert_alignment;
  } else {
    if (req.topk_idx) {
      const Tensor& ti = *req.topk_idx;
      SY_TRY(check_dtype("topkIdx", ti, {DType::I64, DType::I32}));
      SY_TRY(check_shape("topkIdx", ti, {T, -1}, "tokens, topk"));
      SY_TRY(check_topk_width("topkIdx", ti.shape[1]));
      if (!req.topk_weights) return invalid("topkWeights", "topkWeights: required with topkIdx");
      SY_TRY(check_dtype("topkWeights", *req.topk_weights, {DType::F32}));
      SY_TRY(check_shape("topkWeights", *req.topk_weights, {T, ti.shape[1]}, "tokens, topk"));
      SY_TRY(check_num_experts(req.num_experts, R));
      w->topk = int(ti.shape[1]);
      w->topk_dtype = ti.dtype;
      w->num_experts = req.num_experts;
      w->num_local_experts = req.num_experts / R;
    } else if (req.topk_weights) {
      return invalid("topkWeights", "topkWeights: given without topkIdx");
    }
    if (req.is_token_in_rank) {
      SY_TRY(check_dtype("isTokenInRank", *req.is_token_in_rank, {DType::Bool}));
      SY_TRY(check_shape("isTokenInRank", *req.is_token_in_rank, {T, R}, "tokens, ranks"));
    }
    if (!req.topk_idx && !req.is_token_in_rank) {
      return invalid("topkIdx", "topkIdx: dispatch needs a routing: topkIdx with numExperts, "
                                "isTokenInRank, or a cached handle");
    }
    if (req.layout == SY_LAYOUT_EXPANDED && !req.topk_idx) {
      return invalid("layout", "layout: the expanded layout needs topkIdx (rows are per expert)");
    }
    SY_TRY(check_range("numWorstTokens", req.num_worst_tokens, 0, int64_t(1) << 31));
    w->mode = req.num_worst_tokens > 0 ? DispatchMode::WorstCase : DispatchMode::Exact;
    w->expert_alignment = req.expert_alignment;
  }
  if (req.layout != SY_LAYOUT_COMPACT && req.layout != SY_LAYOUT_EXPANDED) {
    return invalid("layout", "layout: must be compact (0) or expanded (1), got " + std::to_string(req.layout));
  }
  SY_TRY(check_range("expertAlignment", req.expert_alignment, 1, 1 << 20));
  SY_TRY(check_range("timeoutMs", req.timeout_ms, 0, int64_t(1) << 40));

  w->rank = buf.rank;
  w->num_ranks = R;
  w->layout = req.layout;
  w->zero_padding = req.zero_padding;
  w->num_tokens = T;
  w->hidden = plan.hidden;
  w->num_worst_tokens = req.num_worst_tokens;
  w->x = req.x;
  w->x_scales = req.x_scales;
  w->topk_idx = req.topk_idx;
  w->topk_weights = req.topk_weights;
  w->is_token_in_rank = req.is_token_in_rank;
  return ok();
}

Error new_handle(const BufferCore& buf, const DispatchWork& w, std::shared_ptr<DispatchHandle>* out) {
  auto h = std::make_shared<DispatchHandle>();
  const int R = w.num_ranks;
  h->group = buf.group;
  h->set = buf.set.get();
  h->rank = buf.rank;
  h->num_ranks = R;
  h->num_experts = w.num_experts;
  h->num_local_experts = w.num_local_experts;
  h->num_topk = w.topk;
  h->layout = w.layout;
  h->expert_alignment = w.expert_alignment;
  h->hidden = w.hidden;
  h->num_tokens = w.num_tokens;
  h->topk_dtype = w.topk_dtype;
  h->worst_case = w.mode == DispatchMode::WorstCase;
  h->status = w.status;
  SY_TRY(new_output(buf, DType::I32, {R, R}, &h->rank_prefix_matrix));
  SY_TRY(new_output(buf, DType::Bool, {w.num_tokens, R}, &h->is_token_in_rank));
  SY_TRY(new_output(buf, DType::I32, {w.num_tokens, R}, &h->send_slot));
  for (auto* t : {&h->rank_prefix_matrix, &h->is_token_in_rank, &h->send_slot}) (*t)->producer = w.status;
  *out = std::move(h);
  return ok();
}

// Per-received-token tensors of the handle, `capacity` entries.
Error size_handle(const BufferCore& buf, DispatchHandle& h, int64_t capacity, int64_t rows) {
  h.recv_capacity = capacity;
  h.num_rows = rows;
  SY_TRY(new_output(buf, DType::I32, {capacity}, &h.recv_src_idx));
  SY_TRY(new_output(buf, DType::I32, {capacity}, &h.recv_src_rank));
  h.recv_src_idx->producer = h.recv_src_rank->producer = h.status;
  if (h.layout == SY_LAYOUT_EXPANDED) {
    SY_TRY(new_output(buf, DType::I32, {capacity, h.num_topk}, &h.expanded_row));
    h.expanded_row->producer = h.status;
  }
  return ok();
}

Error allocate_outputs(const BufferCore& buf, DispatchWork& w, int64_t rows) {
  w.out_rows = rows;
  // Payload rows a dispatch does not write (past the received ones in worst-case mode, expanded
  // padding without zeroPadding) are undefined on both backends, so their memory need not be
  // zeroed: a worst-case output is sized for every rank's every token.
  const OutputWritten payload = OutputWritten::Partly;
  SY_TRY(new_output(buf, w.x_dtype, {rows, w.hidden}, &w.recv_x, payload));
  if (w.num_scales > 0) SY_TRY(new_output(buf, w.scale_dtype, {rows, w.num_scales}, &w.recv_x_scales, payload));
  if (w.topk > 0) {
    if (w.layout == SY_LAYOUT_COMPACT) {
      SY_TRY(new_output(buf, w.topk_dtype, {rows, w.topk}, &w.recv_topk_idx));
      SY_TRY(new_output(buf, DType::F32, {rows, w.topk}, &w.recv_topk_weights));
    } else {
      SY_TRY(new_output(buf, DType::F32, {rows}, &w.recv_topk_weights));
    }
  }
  SY_TRY(new_output(buf, DType::I32, {1}, &w.recv_count));
  for (auto* t : {&w.recv_x, &w.recv_x_scales, &w.recv_topk_idx, &w.recv_topk_weights, &w.recv_count})
    if (*t) (*t)->producer = w.status;
  return ok();
}

std::vector<int32_t> aligned(const std::vector<int32_t>& counts, int alignment) {
  std::vector<int32_t> out(counts.size());
  for (size_t i = 0; i < counts.size(); ++i) out[i] = int32_t(core::align_count(counts[i], alignment));
  return out;
}

}  // namespace

// A collective refused on this rank before its first stage was enqueued (`why`: bad arguments,
// an allocation): it still takes its place in the operation sequence as a rejection at the
// barrier (Backend::reject), so the peers fail within milliseconds naming this rank, the
// buffers stay usable, and every rank's next call lines up. If even that cannot be enqueued,
// the refusal stands alone (the peers then time out). With enqueue_mu held.
static Error refuse_locked(BufferCore& buf, core::OpKind kind, Error why) {
  if (Error untold = buf.group->backend->reject(buf, *buf.comm_stream, kind, buf.next_epoch)) {
    return untold_refusal_error(std::move(why), untold);
  }
  buf.next_epoch++;
  why.peers_informed = true;
  return why;
}

Error refuse(BufferCore& buf, core::OpKind kind, Error why) {
  std::lock_guard<std::mutex> lock(buf.enqueue_mu);
  return refuse_locked(buf, kind, std::move(why));
}

Error op_dispatch(BufferCore& buf, const DispatchRequest& req, DispatchOutputs* out) {
  auto w = std::make_shared<DispatchWork>();
  Backend& backend = *buf.group->backend;
  Error prepared = [&]() -> Error {
    SY_TRY(validate_dispatch(buf, req, w.get()));
    if (w->cached) {
      w->handle = req.cached;
    } else {
      SY_TRY(new_handle(buf, *w, &w->handle));
    }
    DispatchHandle& h = *w->handle;
    const int64_t worst_expanded_capacity = buf.plan.max_recv_rows();
    if (w->mode == DispatchMode::WorstCase) {
      const int64_t cap = w->layout == SY_LAYOUT_COMPACT ? w->num_worst_tokens : worst_expanded_capacity;
      SY_TRY(size_handle(buf, h, cap, w->num_worst_tokens));
      SY_TRY(allocate_outputs(buf, *w, w->num_worst_tokens));
    } else if (w->mode == DispatchMode::Cached) {
      SY_TRY(allocate_outputs(buf, *w, h.num_rows));
    }
    return ok();
  }();
  if (prepared) return refuse(buf, core::OpKind::Dispatch, std::move(prepared));
  DispatchHandle& h = *w->handle;

  // One operation at a time per buffer, so every rank numbers them alike. A call refused before
  // its first stage is enqueued still takes its number (refuse); once it is enqueued, the peers
  // count on it, so a later failure still ends it in stream order (dispatch_abandon).
  std::lock_guard<std::mutex> lock(buf.enqueue_mu);
  w->epoch = buf.next_epoch;
  if (Error e = begin_on_comm(buf, req.order)) return refuse_locked(buf, core::OpKind::Dispatch, std::move(e));
  if (Error e = backend.dispatch_notify(buf, *buf.comm_stream, w)) {
    if (!w->peers_wait_for_it) return refuse_locked(buf, core::OpKind::Dispatch, std::move(e));
    // The peers count on this epoch: keep in step, end it in order.
    buf.next_epoch++;
    if (!w->cached) h.state.store(2);
    w->status->fail(e);
    backend.dispatch_abandon(buf, *buf.comm_stream, w);
    return e;
  }
  buf.next_epoch++;

  Error e = [&]() -> Error {
    if (w->mode == DispatchMode::Exact) {
      // The host waits for the counts, then sizes the outputs exactly. The deadline is longer
      // than the peers' own, so their report (which names the missing rank) arrives first.
      const int64_t t = req.timeout_ms > 0 ? req.timeout_ms : buf.timeout_ms;
      SY_TRY(backend.dispatch_wait_counts(*w, Deadline::after_ms(outer_timeout_ms(t))));
      int64_t rows = w->num_recv_tokens;
      if (w->layout == SY_LAYOUT_EXPANDED) {
        rows = core::expanded_rows(w->expert_counts_exact.data(), w->num_local_experts, w->expert_alignment, nullptr);
      }
      SY_TRY(size_handle(buf, h, w->num_recv_tokens, rows));
      h.num_recv_tokens.store(w->num_recv_tokens);
      SY_TRY(allocate_outputs(buf, *w, rows));
      std::lock_guard<std::mutex> hl(h.mu);
      h.expert_counts = aligned(w->expert_counts_exact, w->expert_alignment);
      h.expert_counts_known = w->topk > 0;
    }
    return backend.dispatch_epilogue(buf, *buf.comm_stream, w);
  }();
  if (e) {
    if (!w->cached) h.state.store(2);
    w->status->fail(e);
    backend.dispatch_abandon(buf, *buf.comm_stream, w);
    return e;
  }
  SY_TRY(end_on_comm(buf, req.order, &out->event, w->status));

  out->recv_x = w->recv_x;
  out->recv_x_scales = w->recv_x_scales;
  out->recv_topk_idx = w->recv_topk_idx;
  out->recv_topk_weights = w->recv_topk_weights;
  out->recv_count = w->recv_count;
  out->handle = w->handle;
  out->num_rows = w->out_rows;
  out->num_local_experts = w->num_local_experts;
  out->num_recv_tokens = w->mode == DispatchMode::WorstCase ? -1 : h.num_recv_tokens.load();
  if (w->mode == DispatchMode::Exact) out->num_recv_tokens = w->num_recv_tokens;
  return ok();
}

namespace {

// Everything combine checks and allocates before it is enqueued.
Error prepare_combine(BufferCore& buf, const CombineRequest& req, std::shared_ptr<CombineWork>* out) {
  SY_TRY(check_order(req.order, buf));
  if (!req.handle) return invalid("handle", "handle: required (the handle dispatch returned)");
  SY_TRY(check_handle(*req.handle, buf));
  req.handle->refresh();
  const DispatchHandle& h = *req.handle;
  if (h.state.load() == 2) return invalid("handle", "handle: its dispatch failed, so it holds no routing");
  SY_TRY(check_tensor_arg("x", req.x, buf));
  SY_TRY(check_tensor_arg("topkWeights", req.topk_weights, buf));
  SY_TRY(check_tensor_arg("bias", req.bias0, buf));
  SY_TRY(check_tensor_arg("bias", req.bias1, buf));
  SY_TRY(check_output_arg("out", req.out, buf));
  if (!req.x) return invalid("x", "x: required");
  const int H = buf.plan.hidden;
  SY_TRY(check_dtype("x", *req.x, {DType::BF16}));
  SY_TRY(check_shape("x", *req.x, {h.num_rows, H}, "rows of the dispatch output, hidden"));
  SY_TRY(check_rows_contiguous("x", *req.x));
  int topk = 0;
  if (req.topk_weights) {
    if (h.layout == SY_LAYOUT_EXPANDED) {
      return invalid("topkWeights", "topkWeights: combine of an expanded dispatch takes no top-k "
                                    "weights (each row already belongs to one expert)");
    }
    SY_TRY(check_dtype("topkWeights", *req.topk_weights, {DType::F32}));
    SY_TRY(check_shape("topkWeights", *req.topk_weights, {h.num_rows, -1}, "rows, topk"));
    SY_TRY(check_topk_width("topkWeights", req.topk_weights->shape[1]));
    topk = int(req.topk_weights->shape[1]);
  }
  for (const auto* b : {&req.bias0, &req.bias1}) {
    if (!*b) continue;
    SY_TRY(check_dtype("bias", **b, {DType::BF16}));
    SY_TRY(check_shape("bias", **b, {h.num_tokens, H}, "tokens, hidden"));
    SY_TRY(check_rows_contiguous("bias", **b));
  }
  if (req.internode_reduction != SY_INTERNODE_CHAIN && req.internode_reduction != SY_INTERNODE_HIERARCHICAL) {
    return invalid("internodeReduction", "internodeReduction: expected 0 (chain) or 1 (hierarchical), got " +
                                             std::to_string(req.internode_reduction));
  }
  auto w = std::make_shared<CombineWork>();
  w->rank = buf.rank;
  w->num_ranks = buf.group->num_ranks;
  w->hidden = H;
  w->topk = topk;
  w->internode_reduction = req.internode_reduction;
  w->handle = req.handle;
  w->x = req.x;
  w->topk_weights = req.topk_weights;
  w->bias0 = req.bias0;
  w->bias1 = req.bias1;
  if (req.out) {
    SY_TRY(check_dtype("out", *req.out, {DType::BF16}));
    SY_TRY(check_shape("out", *req.out, {h.num_tokens, H}, "tokens, hidden"));
    SY_TRY(check_rows_contiguous("out", *req.out));
    w->out = req.out;
  } else {
    SY_TRY(new_output(buf, DType::BF16, {h.num_tokens, H}, &w->out));
  }
  if (topk > 0) SY_TRY(new_output(buf, DType::F32, {h.num_tokens, topk}, &w->out_topk_weights));
  *out = std::move(w);
  return ok();
}

}  // namespace

Error op_combine(BufferCore& buf, const CombineRequest& req, CombineOutputs* out) {
  std::shared_ptr<CombineWork> w;
  if (Error e = prepare_combine(buf, req, &w)) return refuse(buf, core::OpKind::Combine, std::move(e));
  std::lock_guard<std::mutex> lock(buf.enqueue_mu);
  w->epoch = buf.next_epoch;
  if (Error e = begin_on_comm(buf, req.order)) return refuse_locked(buf, core::OpKind::Combine, std::move(e));
  // The outputs (a caller's `out` too) hold this combine's result once it is enqueued, or its
  // failure if it was enqueued in part.
  auto produced_by = [&](const std::shared_ptr<OpStatus>& status) {
    w->out->producer = status;
    if (w->out_topk_weights) w->out_topk_weights->producer = status;
  };
  if (Error e = buf.group->backend->combine(buf, *buf.comm_stream, w)) {
    if (!w->peers_wait_for_it) return refuse_locked(buf, core::OpKind::Combine, std::move(e));
    buf.next_epoch++;  // the peers count on this epoch
    w->status->fail(e);
    produced_by(w->status);
    return e;
  }
  buf.next_epoch++;
  produced_by(w->status);
  SY_TRY(end_on_comm(buf, req.order, &out->event, w->status));
  out->combined_x = w->out;
  out->combined_topk_weights = w->out_topk_weights;
  return ok();
}

}  // namespace sy
