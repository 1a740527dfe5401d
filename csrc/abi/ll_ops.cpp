#include "ll_ops.h"

#include <string>

#include "../core/limits.h"
#include "../core/quant.h"
#include "ops.h"
#include "protocol_errors.h"
#include "validate.h"

namespace sy {

using core::DType;

namespace {

Error check_ll_buffer(const BufferCore& buf) {
  if (buf.plan.ll.experts > 0) return ok();
  return invalid("buffer", "buffer: created without a low-latency region; pass lowLatency: { numExperts } "
                           "when creating it");
}

Error check_ll_handle(const LLHandle& h, const BufferCore& buf) {
  if (h.set != buf.set.get() || h.rank != buf.rank) {
    return fail(SY_ERROR_WRONG_HANDLE, "handle: the low-latency handle comes from another buffer (rank " +
                                           std::to_string(h.rank) + ")",
                "handle");
  }
  return ok();
}

Error check_topk_tensor(const BufferCore& buf, const std::shared_ptr<Tensor>& t, int64_t tokens) {
  if (!t) return invalid("topkIdx", "topkIdx: required");
  SY_TRY(check_tensor_arg("topkIdx", t, buf));
  SY_TRY(check_dtype("topkIdx", *t, {DType::I64, DType::I32}));
  SY_TRY(check_shape("topkIdx", *t, {tokens, -1}, "tokens, topk"));
  if (t->shape[1] < 1 || t->shape[1] > core::kMaxTopk) {
    return invalid("topkIdx", "topkIdx: 1 to " + std::to_string(core::kMaxTopk) +
                                  " experts per token are supported, got " + std::to_string(t->shape[1]));
  }
  return ok();
}

Error check_stats(const BufferCore& buf, const char* arg, const std::shared_ptr<Tensor>& t, DType dtype, int64_t n,
                  const char* what) {
  if (!t) return ok();
  SY_TRY(check_output_arg(arg, t, buf));  // accumulated into
  SY_TRY(check_dtype(arg, *t, {dtype}));
  return check_shape(arg, *t, {n}, what);
}

Error check_stream(const BufferCore& buf, const std::shared_ptr<Stream>& s) {
  StreamOrder o;
  o.compute = s;
  return check_order(o, buf);
}

std::shared_ptr<LLWork> new_work(const BufferCore& buf) {
  auto p = std::make_shared<LLWork>();
  LLWork& w = *p;
  const core::LowLatencyPlan& ll = buf.plan.ll;
  w.rank = buf.rank;
  w.num_ranks = ll.ranks;
  w.num_experts = ll.experts;
  w.num_local_experts = ll.local_experts;
  w.max_tokens = ll.max_tokens;
  w.hidden = ll.hidden;
  w.timeout_ms = buf.timeout_ms;
  w.masking = buf.masking;
  return p;
}

// Marks an operation whose receive phase waits for its hook, or clears the mark.
void set_waiting_for_hook(OpStatus& status, bool waiting) {
  std::lock_guard<std::mutex> l(status.mu);
  status.unfinished = waiting ? invalid("hook", "hook: the receive phase of this low-latency call has not run; "
                                                "call hook.run() before using its outputs")
                              : Error();
}

// Takes the next call number and its half. Caller holds enqueue_mu.
void take_call(BufferCore& buf, LLWork& w) {
  w.call = ++buf.ll_calls;
  w.half = int(w.call % 2);
  buf.half_use[w.half]->store(w.call);
  // A zero-copy buffer handed out for this call is void unless this is the combine that reads it.
  if (w.call == buf.zero_copy_call && !w.zero_copy && buf.zero_copy_void) buf.zero_copy_void->store(true);
  // The call before last on this half waited for a hook that can no longer run: its data is
  // given up, and the senders are told so before this call's own send waits for them.
  if (auto& voided = buf.awaiting_hook[w.half]) {
    voided->status->fail(invalid("hook", "hook: low-latency call " + std::to_string(w.call) +
                                             " reused the half of the double buffer before call " +
                                             std::to_string(voided->call) + "'s receive hook ran"));
    set_waiting_for_hook(*voided->status, false);
    w.ack_voided_call = voided->call;
    voided.reset();
  }
}

// Runs `send` now and `recv` either now (on the communication stream, ordered like the normal
// operations) or later through a hook (both on the compute stream, nothing held in between).
Error place_phases(const std::shared_ptr<BufferCore>& buf, const std::shared_ptr<LLWork>& w,
                   const std::shared_ptr<Stream>& compute, uint32_t flags,
                   Error (Backend::*send)(BufferCore&, Stream&, std::shared_ptr<LLWork>),
                   Error (Backend::*recv)(BufferCore&, Stream&, std::shared_ptr<LLWork>),
                   std::shared_ptr<Event>* event, std::shared_ptr<Hook>* hook, bool* sent) {
  Backend& backend = *buf->group->backend;
  if (flags & SY_LL_RETURN_HOOK) {
    SY_TRY((backend.*send)(*buf, *compute, w));
    *sent = true;
    auto hk = std::make_shared<Hook>();
    hk->buf = buf;
    hk->call = w->call;
    hk->half_use = buf->half_use[w->half];
    hk->enqueue = [buf, w, compute, recv]() -> Error {  // under buf->enqueue_mu
      set_waiting_for_hook(*w->status, false);
      if (buf->awaiting_hook[w->half] == w) buf->awaiting_hook[w->half].reset();
      SY_TRY((buf->group->backend.get()->*recv)(*buf, *compute, w));
      if (w->handle && recv == &Backend::ll_dispatch_recv) w->handle->recv_enqueued.store(true);
      return ok();
    };
    set_waiting_for_hook(*w->status, true);
    buf->awaiting_hook[w->half] = w;
    *hook = hk;
    return ok();
  }
  StreamOrder o;
  o.compute = compute;
  o.async_finish = (flags & SY_LL_ASYNC_FINISH) != 0;
  SY_TRY(begin_on_comm(*buf, o));
  SY_TRY((backend.*send)(*buf, *buf->comm_stream, w));
  *sent = true;
  SY_TRY((backend.*recv)(*buf, *buf->comm_stream, w));
  if (w->handle && recv == &Backend::ll_dispatch_recv) w->handle->recv_enqueued.store(true);
  return end_on_comm(*buf, o, event, w->status);
}

Error check_flags(uint32_t flags, uint32_t allowed) {
  if (flags & ~allowed) return invalid("flags", "flags: unknown or inapplicable flags " + std::to_string(flags & ~allowed));
  if ((flags & SY_LL_RETURN_HOOK) && (flags & SY_LL_ASYNC_FINISH)) {
    return invalid("returnRecvHook", "returnRecvHook: cannot be combined with asyncFinish (the hook runs the "
                                     "receive phase on the compute stream when you call it)");
  }
  return ok();
}

// A low-latency call refused on this rank (`why`) before its send phase was enqueued: it takes
// its call number and half all the same (unless `w` has them already), and the backend tells
// the peers (Backend::ll_reject), so they fail that call at once naming this rank and every
// rank's next call lines up. If even that cannot be enqueued, the refusal stands alone (the
// peers then time out). With enqueue_mu held.
Error refuse_locked(const std::shared_ptr<BufferCore>& buf, std::shared_ptr<LLWork> w, bool dispatch, Error why) {
  if (!w->call) take_call(*buf, *w);
  if (Error untold = buf->group->backend->ll_reject(*buf, *buf->comm_stream, std::move(w), dispatch)) {
    return untold_refusal_error(std::move(why), untold);
  }
  why.peers_informed = true;
  return why;
}

Error refuse(const std::shared_ptr<BufferCore>& buf, bool dispatch, Error why) {
  std::lock_guard<std::mutex> lock(buf->enqueue_mu);
  return refuse_locked(buf, new_work(*buf), dispatch, std::move(why));
}

Error prepare_dispatch(BufferCore& buf, const LLDispatchRequest& req, LLWork& w) {
  SY_TRY(check_stream(buf, req.compute));
  SY_TRY(check_flags(req.flags, SY_LL_FP8 | SY_LL_ROUND_SCALE | SY_LL_UE8M0 | SY_LL_ASYNC_FINISH | SY_LL_RETURN_HOOK));
  const bool fp8 = req.flags & SY_LL_FP8, round = req.flags & SY_LL_ROUND_SCALE, ue8m0 = req.flags & SY_LL_UE8M0;
  if (round && !fp8) return invalid("roundScale", "roundScale: only applies with useFp8");
  if (ue8m0 && !round) return invalid("useUe8m0", "useUe8m0: needs roundScale (UE8M0 holds power-of-two scales)");
  if (!req.x) return invalid("x", "x: required");
  SY_TRY(check_tensor_arg("x", req.x, buf));
  SY_TRY(check_dtype("x", *req.x, {DType::BF16}));
  SY_TRY(check_shape("x", *req.x, {-1, w.hidden}, "tokens, hidden"));
  SY_TRY(check_rows_contiguous("x", *req.x));
  const int64_t T = req.x->shape[0];
  if (T > w.max_tokens) {
    return invalid("x", "x: " + std::to_string(T) + " tokens exceed maxTokensPerRank " + std::to_string(w.max_tokens));
  }
  SY_TRY(check_topk_tensor(buf, req.topk_idx, T));
  SY_TRY(check_stats(buf, "cumulativeLocalExpertRecvStats", req.expert_stats, DType::I32, w.num_local_experts,
                     "local experts"));
  SY_TRY(check_stats(buf, "dispatchWaitRecvCostStats", req.wait_stats, DType::I64, w.num_ranks, "ranks"));
  w.num_tokens = T;
  w.topk = int(req.topk_idx->shape[1]);
  w.fp8 = fp8;
  w.round_scale = round;
  w.ue8m0 = ue8m0;
  w.x = req.x;
  w.topk_idx = req.topk_idx;
  w.expert_stats = req.expert_stats;
  w.wait_stats = req.wait_stats;

  const int64_t EL = w.num_local_experts, N = int64_t(w.num_ranks) * w.max_tokens;
  SY_TRY(new_output(buf, fp8 ? DType::FP8E4M3 : DType::BF16, {EL, N, w.hidden}, &w.recv_x, OutputWritten::Partly));
  if (fp8) {
    const int64_t S = core::ll_scale_words(w.hidden, ue8m0);
    SY_TRY(new_output(buf, ue8m0 ? DType::I32 : DType::F32, {EL, N, S}, &w.recv_x_scales));
    // Column-major in the last two dimensions, as grouped GEMMs with TMA want them.
    w.recv_x_scales->strides[1] = 1;
    w.recv_x_scales->strides[2] = N;
  }
  SY_TRY(new_output(buf, DType::I32, {EL}, &w.recv_count));
  for (auto* t : {&w.recv_x, &w.recv_x_scales, &w.recv_count})
    if (*t) (*t)->producer = w.status;
  auto h = std::make_shared<LLHandle>();
  h->status = w.status;
  h->group = buf.group;
  h->set = buf.set.get();
  h->rank = buf.rank;
  h->num_ranks = w.num_ranks;
  h->num_experts = w.num_experts;
  h->num_local_experts = w.num_local_experts;
  h->max_tokens = w.max_tokens;
  h->hidden = w.hidden;
  h->num_tokens = T;
  SY_TRY(new_output(buf, DType::I32, {EL, N}, &h->src_info));
  SY_TRY(new_output(buf, DType::I64, {EL, int64_t(w.num_ranks)}, &h->layout_range));
  h->src_info->producer = h->layout_range->producer = w.status;
  w.handle = h;
  return ok();
}

Error prepare_combine(BufferCore& buf, const LLCombineRequest& req, LLWork& w) {
  SY_TRY(check_stream(buf, req.compute));
  SY_TRY(check_flags(req.flags, SY_LL_LOGFMT | SY_LL_ZERO_COPY | SY_LL_ASYNC_FINISH | SY_LL_RETURN_HOOK));
  if (!req.handle) return invalid("handle", "handle: required (the handle lowLatencyDispatch returned)");
  SY_TRY(check_ll_handle(*req.handle, buf));
  const LLHandle& h = *req.handle;
  if (!h.recv_enqueued.load()) {
    return invalid("handle", "handle: the receive phase of low-latency call " + std::to_string(h.call) +
                                 " has not been run; call its hook before combining");
  }
  w.logfmt = req.flags & SY_LL_LOGFMT;
  w.zero_copy = req.flags & SY_LL_ZERO_COPY;
  if (w.logfmt && w.zero_copy) {
    return invalid("zeroCopy", "zeroCopy: cannot be combined with useLogfmt (the rows are encoded while sent)");
  }
  const int64_t N = int64_t(w.num_ranks) * w.max_tokens, T = h.num_tokens;
  if (!w.zero_copy) {
    if (!req.x) return invalid("x", "x: required (or pass zeroCopy after writing into nextCombineBuffer)");
    SY_TRY(check_tensor_arg("x", req.x, buf));
    SY_TRY(check_dtype("x", *req.x, {DType::BF16}));
    SY_TRY(check_shape("x", *req.x, {w.num_local_experts, N, w.hidden}, "local experts, ranks * maxTokensPerRank, hidden"));
    if (!req.x->is_dense()) return invalid("x", "x: must be dense (row-major)");
  }
  SY_TRY(check_topk_tensor(buf, req.topk_idx, T));
  if (!req.topk_weights) return invalid("topkWeights", "topkWeights: required");
  SY_TRY(check_tensor_arg("topkWeights", req.topk_weights, buf));
  SY_TRY(check_dtype("topkWeights", *req.topk_weights, {DType::F32}));
  SY_TRY(check_shape("topkWeights", *req.topk_weights, {T, req.topk_idx->shape[1]}, "tokens, topk"));
  SY_TRY(check_stats(buf, "combineWaitRecvCostStats", req.wait_stats, DType::I64, w.num_ranks, "ranks"));
  if (req.out) {
    SY_TRY(check_output_arg("out", req.out, buf));
    SY_TRY(check_dtype("out", *req.out, {DType::BF16}));
    SY_TRY(check_shape("out", *req.out, {T, w.hidden}, "tokens, hidden"));
    SY_TRY(check_rows_contiguous("out", *req.out));
    w.out = req.out;
  } else {
    SY_TRY(new_output(buf, DType::BF16, {T, w.hidden}, &w.out));
  }
  w.num_tokens = T;
  w.topk = int(req.topk_idx->shape[1]);
  w.x = req.x;
  w.topk_idx = req.topk_idx;
  w.topk_weights = req.topk_weights;
  w.wait_stats = req.wait_stats;
  w.handle = req.handle;
  w.out->producer = w.status;
  return ok();
}

}  // namespace

Error op_ll_dispatch(std::shared_ptr<BufferCore> buf, const LLDispatchRequest& req, LLDispatchOutputs* out) {
  SY_TRY(check_ll_buffer(*buf));  // the same on every rank: nothing to tell the peers
  auto w = new_work(*buf);
  if (Error e = prepare_dispatch(*buf, req, *w)) return refuse(buf, true, std::move(e));
  std::lock_guard<std::mutex> lock(buf->enqueue_mu);
  take_call(*buf, *w);
  w->handle->call = w->call;
  bool sent = false;
  if (Error e = place_phases(buf, w, req.compute, req.flags, &Backend::ll_dispatch_send, &Backend::ll_dispatch_recv,
                             &out->event, &out->hook, &sent)) {
    return sent ? e : refuse_locked(buf, w, true, std::move(e));
  }
  out->recv_x = w->recv_x;
  out->recv_x_scales = w->recv_x_scales;
  out->recv_count = w->recv_count;
  out->handle = w->handle;
  out->num_local_experts = w->num_local_experts;
  return ok();
}

Error op_ll_combine(std::shared_ptr<BufferCore> buf, const LLCombineRequest& req, LLCombineOutputs* out) {
  SY_TRY(check_ll_buffer(*buf));
  auto w = new_work(*buf);
  if (Error e = prepare_combine(*buf, req, *w)) return refuse(buf, false, std::move(e));
  std::lock_guard<std::mutex> lock(buf->enqueue_mu);
  if (w->zero_copy && buf->zero_copy_call != buf->ll_calls + 1) {
    return refuse_locked(buf, new_work(*buf), false,
                         invalid("zeroCopy", "zeroCopy: the expert outputs must be written into nextCombineBuffer() "
                                             "taken right before this combine (it was taken for call " +
                                                 std::to_string(buf->zero_copy_call) + ", this is call " +
                                                 std::to_string(buf->ll_calls + 1) + ")"));
  }
  take_call(*buf, *w);
  // From here the zero-copy rows are being sent: the view takes no more writes.
  if (w->zero_copy && buf->zero_copy_consumed) buf->zero_copy_consumed->store(true);
  bool sent = false;
  if (Error e = place_phases(buf, w, req.compute, req.flags, &Backend::ll_combine_send, &Backend::ll_combine_recv,
                             &out->event, &out->hook, &sent)) {
    return sent ? e : refuse_locked(buf, w, false, std::move(e));
  }
  out->combined_x = w->out;
  return ok();
}

Error op_ll_refuse(std::shared_ptr<BufferCore> buf, bool dispatch, Error why) {
  if (check_ll_buffer(*buf)) {  // no rank has the region: every rank's call fails alike
    why.peers_informed = true;
    return why;
  }
  return refuse(buf, dispatch, std::move(why));
}

Error op_ll_next_combine_buffer(BufferCore& buf, const LLHandle& handle, std::shared_ptr<Tensor>* out) {
  SY_TRY(check_ll_buffer(buf));
  SY_TRY(check_ll_handle(handle, buf));
  const core::LowLatencyPlan& ll = buf.plan.ll;
  std::lock_guard<std::mutex> lock(buf.enqueue_mu);
  const uint32_t next = buf.ll_calls + 1;
  const int half = int(next % 2);
  auto t = std::make_shared<Tensor>();
  t->group = buf.group;
  t->rank = buf.rank;
  t->dtype = DType::BF16;
  t->ndim = 3;
  t->shape[0] = ll.local_experts;
  t->shape[1] = ll.recv_rows();
  t->shape[2] = ll.hidden;
  dense_strides(3, t->shape, t->strides);
  t->memory = buf.region;  // a view: the buffer's memory, kept alive by the view
  t->offset_bytes = ll.half(half) + ll.off_send;
  t->guard = std::make_shared<ViewGuard>();
  t->guard->use = buf.half_use[half];
  t->guard->valid_through = next;
  t->guard->what = "the next combine buffer";
  if (buf.zero_copy_call != next || !buf.zero_copy_void) {
    buf.zero_copy_void = std::make_shared<std::atomic<bool>>(false);
    buf.zero_copy_consumed = std::make_shared<std::atomic<bool>>(false);
  }
  t->guard->voided = buf.zero_copy_void;
  t->guard->consumed = buf.zero_copy_consumed;
  buf.zero_copy_call = next;
  *out = std::move(t);
  return ok();
}

Error op_ll_clean(BufferCore& buf, std::shared_ptr<Stream> compute, std::shared_ptr<Event>* done) {
  SY_TRY(check_ll_buffer(buf));
  StreamOrder o;
  o.compute = compute;
  SY_TRY(check_order(o, buf));
  auto status = std::make_shared<OpStatus>();
  std::lock_guard<std::mutex> lock(buf.enqueue_mu);
  const uint32_t epoch = buf.next_epoch;
  buf.next_epoch += 2;  // two barriers: before and after the reset
  SY_TRY(begin_on_comm(buf, o));
  SY_TRY(buf.group->backend->ll_clean(buf, *buf.comm_stream, epoch, status));
  // The compute stream waits for the reset, and the event reports how it went.
  std::shared_ptr<Event> ev;
  SY_TRY(buf.group->backend->create_event(buf.group, buf.rank_core(), &ev, done != nullptr));
  SY_TRY(ev->record(*buf.comm_stream, status));
  SY_TRY(compute->wait_event(*ev));
  if (done) *done = ev;
  // Numbering restarts on every rank; views and hooks of earlier calls are void from here.
  buf.ll_calls = 0;
  buf.zero_copy_call = 0;
  for (auto& waiting : buf.awaiting_hook) {  // their hooks are void; clean resets every flag anyway
    if (!waiting) continue;
    waiting->status->fail(invalid("hook", "hook: clean() ran before this low-latency call's receive hook"));
    set_waiting_for_hook(*waiting->status, false);
    waiting.reset();
  }
  for (auto& use : buf.half_use) {
    auto fresh = std::make_shared<std::atomic<uint32_t>>(0);
    use->store(~0u);  // invalidates every earlier view and hook
    use = fresh;
  }
  return ok();
}

Error run_hook(Hook& hook) {
  std::lock_guard<std::mutex> order(hook.buf->enqueue_mu);
  std::lock_guard<std::mutex> lock(hook.mu);
  if (hook.ran) return invalid("hook", "hook: this receive hook has already run");
  const uint32_t now = hook.half_use->load();
  if (now != hook.call) {
    return invalid("hook", "hook: low-latency call " + std::to_string(now) + " has reused the half of the double "
                           "buffer that call " + std::to_string(hook.call) +
                           "'s data is in; run each hook before the call after next");
  }
  SY_TRY(hook.enqueue());
  hook.ran = true;
  return ok();
}

}  // namespace sy
