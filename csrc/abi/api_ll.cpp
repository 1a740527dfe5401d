// The C ABI of the low-latency mode and of rank masking (switchyard.h).
#include <algorithm>
#include <cstring>
#include <vector>

#include "api_util.h"
#include "ll_ops.h"
#include "validate.h"

using namespace sy;

extern "C" {

SY_API sy_status sy_ll_dispatch(sy_buffer buffer, const sy_ll_dispatch_args* args, sy_ll_dispatch_result* out) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    LLDispatchRequest req;
    // An argument refused here is a refusal of this rank's call: the peers are told (op_ll_refuse).
    Error resolved = [&]() -> Error {
      sy_ll_dispatch_args a;
      SY_TRY(read_struct(args, "args", &a));
      if (out == nullptr) return invalid("out", "out: NULL");
      req.flags = a.flags;
      SY_TRY(resolve_tensor_opt(a.x, "x", &req.x));
      SY_TRY(resolve_tensor_opt(a.topk_idx, "topkIdx", &req.topk_idx));
      SY_TRY(resolve_tensor_opt(a.cumulative_local_expert_recv_stats, "cumulativeLocalExpertRecvStats",
                                &req.expert_stats));
      SY_TRY(resolve_tensor_opt(a.dispatch_wait_recv_cost_stats, "dispatchWaitRecvCostStats", &req.wait_stats));
      return resolve(a.compute_stream, Kind::Stream, "stream", &req.compute);
    }();
    if (resolved) return op_ll_refuse(b, true, std::move(resolved));
    LLDispatchOutputs o;
    SY_TRY(op_ll_dispatch(b, req, &o));
    sy_ll_dispatch_result r;
    std::memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    r.num_local_experts = o.num_local_experts;
    r.recv_x = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.recv_x));
    r.recv_x_scales = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.recv_x_scales));
    r.recv_count = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.recv_count));
    r.handle = static_cast<sy_ll_handle>(handle_or_null(Kind::LLHandle, o.handle));
    r.event = static_cast<sy_event>(handle_or_null(Kind::Event, o.event));
    r.hook = static_cast<sy_hook>(handle_or_null(Kind::Hook, o.hook));
    return write_struct(out, r, "out");
  });
}

SY_API sy_status sy_ll_combine(sy_buffer buffer, const sy_ll_combine_args* args, sy_ll_combine_result* out) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    LLCombineRequest req;
    Error resolved = [&]() -> Error {
      sy_ll_combine_args a;
      SY_TRY(read_struct(args, "args", &a));
      if (out == nullptr) return invalid("out", "out: NULL");
      req.flags = a.flags;
      SY_TRY(resolve_tensor_opt(a.x, "x", &req.x));
      SY_TRY(resolve_tensor_opt(a.topk_idx, "topkIdx", &req.topk_idx));
      SY_TRY(resolve_tensor_opt(a.topk_weights, "topkWeights", &req.topk_weights));
      SY_TRY(resolve_tensor_opt(a.out, "out", &req.out));
      SY_TRY(resolve_tensor_opt(a.combine_wait_recv_cost_stats, "combineWaitRecvCostStats", &req.wait_stats));
      SY_TRY(resolve(a.handle, Kind::LLHandle, "handle", &req.handle));
      return resolve(a.compute_stream, Kind::Stream, "stream", &req.compute);
    }();
    if (resolved) return op_ll_refuse(b, false, std::move(resolved));
    LLCombineOutputs o;
    SY_TRY(op_ll_combine(b, req, &o));
    sy_ll_combine_result r;
    std::memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    r.combined_x = static_cast<sy_tensor>(handle_or_null(Kind::Tensor, o.combined_x));
    r.event = static_cast<sy_event>(handle_or_null(Kind::Event, o.event));
    r.hook = static_cast<sy_hook>(handle_or_null(Kind::Hook, o.hook));
    return write_struct(out, r, "out");
  });
}

SY_API sy_status sy_hook_run(sy_hook hook) {
  return guarded(hook, [&]() -> Error {
    std::shared_ptr<Hook> h;
    SY_TRY(resolve(hook, Kind::Hook, "hook", &h));
    return run_hook(*h);
  });
}

SY_API sy_status sy_hook_destroy(sy_hook hook) {
  return guarded(nullptr, [&] { return release_handle(hook, Kind::Hook, "hook"); });
}

SY_API sy_status sy_ll_handle_destroy(sy_ll_handle handle) {
  return guarded(nullptr, [&] { return release_handle(handle, Kind::LLHandle, "handle"); });
}

SY_API sy_status sy_ll_handle_info_get(sy_ll_handle handle, sy_ll_handle_info* info) {
  return guarded(handle, [&]() -> Error {
    std::shared_ptr<LLHandle> h;
    SY_TRY(resolve(handle, Kind::LLHandle, "handle", &h));
    sy_ll_handle_info v;
    std::memset(&v, 0, sizeof v);
    v.struct_size = sizeof v;
    v.rank = h->rank;
    v.num_ranks = h->num_ranks;
    v.num_experts = h->num_experts;
    v.num_local_experts = h->num_local_experts;
    v.max_tokens_per_rank = h->max_tokens;
    v.hidden = h->hidden;
    v.num_tokens = int32_t(h->num_tokens);
    v.call = h->call;
    v.received = h->received.load() ? 1 : 0;
    return write_struct(info, v, "info");
  });
}

SY_API sy_status sy_ll_handle_tensor(sy_ll_handle handle, int32_t kind, sy_tensor* out) {
  return guarded(handle, [&]() -> Error {
    std::shared_ptr<LLHandle> h;
    SY_TRY(resolve(handle, Kind::LLHandle, "handle", &h));
    if (out == nullptr) return invalid("out", "out: NULL");
    std::shared_ptr<Tensor> t;
    if (kind == SY_LL_HANDLE_SRC_INFO) t = h->src_info;
    else if (kind == SY_LL_HANDLE_LAYOUT_RANGE) t = h->layout_range;
    else return invalid("kind", "kind: unknown low-latency handle tensor " + std::to_string(kind));
    *out = static_cast<sy_tensor>(register_handle(Kind::Tensor, read_only_view(t)));
    return ok();
  });
}

SY_API sy_status sy_ll_next_combine_buffer(sy_buffer buffer, sy_ll_handle handle, sy_tensor* out) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    std::shared_ptr<LLHandle> h;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    SY_TRY(resolve(handle, Kind::LLHandle, "handle", &h));
    if (out == nullptr) return invalid("out", "out: NULL");
    std::shared_ptr<Tensor> t;
    SY_TRY(op_ll_next_combine_buffer(*b, *h, &t));
    *out = static_cast<sy_tensor>(register_handle(Kind::Tensor, t));
    return ok();
  });
}

SY_API sy_status sy_ll_clean(sy_buffer buffer, sy_stream compute_stream, sy_event* done) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    std::shared_ptr<Stream> s;
    SY_TRY(resolve(buffer, Kind::Buffer, "buffer", &b));
    SY_TRY(resolve(compute_stream, Kind::Stream, "stream", &s));
    std::shared_ptr<Event> ev;
    SY_TRY(op_ll_clean(*b, s, done ? &ev : nullptr));
    if (done) *done = static_cast<sy_event>(register_handle(Kind::Event, ev));
    return ok();
  });
}

static Error masking_buffer(sy_buffer buffer, std::shared_ptr<BufferCore>* b) {
  SY_TRY(resolve(buffer, Kind::Buffer, "buffer", b));
  if (!(*b)->masking) {
    return invalid("buffer", "buffer: created without enableMasking; masks apply only to such buffers");
  }
  return ok();
}

SY_API sy_status sy_mask_update(sy_buffer buffer, int32_t rank, int32_t masked) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(masking_buffer(buffer, &b));
    SY_TRY(check_range("rank", rank, 0, b->group->num_ranks - 1));
    std::lock_guard<std::mutex> order(b->enqueue_mu);
    return b->group->backend->mask_write(*b, rank, 1, masked ? 1u : 0u);
  });
}

SY_API sy_status sy_mask_query(sy_buffer buffer, int32_t* mask, int32_t capacity) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(masking_buffer(buffer, &b));
    if (capacity > 0 && mask == nullptr) return invalid("mask", "mask: NULL");
    const int n = std::max(0, std::min(capacity, b->group->num_ranks));
    std::vector<uint32_t> v(size_t(n), 0u);
    {
      std::lock_guard<std::mutex> order(b->enqueue_mu);
      SY_TRY(b->group->backend->mask_read(*b, v.data(), n));
    }
    for (int r = 0; r < n; ++r) mask[r] = int32_t(v[size_t(r)]);
    return ok();
  });
}

SY_API sy_status sy_mask_clean(sy_buffer buffer) {
  return guarded(buffer, [&]() -> Error {
    std::shared_ptr<BufferCore> b;
    SY_TRY(masking_buffer(buffer, &b));
    std::lock_guard<std::mutex> order(b->enqueue_mu);
    return b->group->backend->mask_write(*b, 0, b->group->num_ranks, 0u);
  });
}

}  // extern "C"
