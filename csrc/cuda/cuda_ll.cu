// The CUDA backend's low-latency mode (cuda_ll.h).
#include "cuda_ll.h"

#include <algorithm>
#include <string>

#include "../abi/protocol_errors.h"
#include "cuda_normal.h"
#include "ll_kernels.h"

namespace sy::cuda {

namespace {

// One call from its send phase to its receive phase: its report (both phases record into it)
// and its device scratch (ll_kernels.h), kept alive by the call's work until the receive is
// enqueued, and then by the deferred release until the kernels are done (device_memory.h).
struct LLCall {
  std::shared_ptr<ReportSlot> report;
  std::shared_ptr<Memory> scratch;
  LLArgs args;
};

// A low-latency handle's device state (LLHandleState), made by its dispatch, and that
// dispatch's report (a combine refused for it reports the dispatch's failure).
struct LLHandleMemory {
  std::shared_ptr<Memory> memory;
  std::shared_ptr<ReportSlot> report;
  uint32_t call = 0;
  int rank = 0;
};

int64_t stride_bytes(const std::shared_ptr<Tensor>& t, int dim) { return t ? t->strides[dim] * t->element_size() : 0; }

// The error a call's report stands for: the low-latency failures worded as the host backend
// words them (protocol_errors.h), the others as the normal mode's.
Error ll_report_error(const KernelReport& r, int rank, uint32_t call, bool dispatch, const LLHandleMemory* handle) {
  const char* op = dispatch ? "dispatch" : "combine";
  if (__atomic_load_n(&r.problem.flag, __ATOMIC_ACQUIRE) == 1 || __atomic_load_n(&r.fail_flag, __ATOMIC_ACQUIRE) != 1) {
    return report_error(r, rank, call, op);  // bad top-k ids, or nothing
  }
  switch (int32_t(r.fail_kind)) {
    case int32_t(LLFailure::SelfRejected): {
      Error e = fail(SY_ERROR_INVALID_ARGUMENT, std::string("this rank rejected its input (see its ") + op + " error)");
      e.peers_informed = true;
      return e;
    }
    case int32_t(LLFailure::Format):
      return ll_format_error(rank, r.peer, op, uint32_t(r.observed), uint32_t(r.expected));
    case int32_t(LLFailure::Count):
      return ll_count_error(r.peer, r.observed);
    case int32_t(LLFailure::Overwritten):
      return ll_overwritten_error(rank, r.peer, dispatch ? "the dispatch data" : "the combine data", call,
                                  uint32_t(r.observed));
    case int32_t(LLFailure::RoutingMismatch):
      return ll_routing_mismatch_error(handle ? handle->call : 0);
    case int32_t(LLFailure::CorruptHandle): {
      Error e = invalid("handle", "handle: corrupt layout range or source token index (entry " +
                                      std::to_string(r.observed) + " of its layout); pass the handle its dispatch returned");
      e.peers_informed = true;
      return e;
    }
    case int32_t(KernelFailure::PeerRejected):
      return ll_peer_rejected_error(rank, r.peer, op, call);
    case int32_t(KernelFailure::DispatchFailed): {
      // The dispatch ran before this combine's send on some stream; its report says why once it
      // is complete (if it is not, it has not delivered yet either).
      Error failed;
      if (handle && handle->report && handle->report->complete()) {
        failed = ll_report_error(*handle->report->host, handle->rank, handle->call, true, nullptr);
      }
      if (!failed) failed = fail(SY_ERROR_PEER_FAILED, "it did not deliver");
      return ll_failed_dispatch_error(handle ? handle->call : 0, failed);
    }
    case int32_t(KernelFailure::Timeout):  // at the operation waited for: call - 2 for a busy half
      return timeout_report_error(r, rank, uint32_t(r.expected));
    default:
      return report_error(r, rank, call, op);  // a peer's abort
  }
}

// What every low-latency kernel of this buffer's call needs to know.
Error base_args(BufferCore& buf, CudaStream& stream, const char* op, uint32_t call, int half, KernelReport* report,
                LLArgs* a) {
  uint8_t* const* bases = nullptr;
  SY_TRY(begin_buffer_operation(buf, stream, op, &bases));
  a->sync.rank = buf.rank;
  a->sync.ranks = buf.group->num_ranks;
  a->sync.epoch = call;
  a->sync.timeout_ns = uint64_t(buf.timeout_ms) * 1000000ull;
  a->sync.bases = bases;
  a->sync.off_abort = buf.plan.off_abort;
  a->sync.off_op_kind = buf.plan.off_op_kind;
  a->sync.off_op_desc = buf.plan.off_op_desc;
  a->sync.off_barrier = buf.plan.off_barrier_epoch;
  a->sync.report = report;
  a->ll = buf.plan.ll;
  a->half = buf.plan.ll.half(half);
  a->off_mask = buf.plan.off_mask;
  a->masking = buf.masking ? 1 : 0;
  return ok();
}

int grid_of(const BufferCore& buf) { return std::max(1, buf.num_sms); }

}  // namespace

Error ll_send(BufferCore& buf, CudaStream& stream, const std::shared_ptr<LLWork>& work, bool dispatch) {
  LLWork& w = *work;
  auto call = std::make_shared<LLCall>();
  SY_TRY(stream.rank_state_ref().reports->take(&call->report));
  LLArgs& a = call->args;
  SY_TRY(base_args(buf, stream, dispatch ? "low-latency dispatch" : "low-latency combine", w.call, w.half,
                   call->report->device, &a));
  Backend& be = *buf.group->backend;
  RankCore& rank = buf.rank_core();
  const int R = buf.group->num_ranks;

  // The scratch: state words, per-source wait times, per-expert counts, per-entry slots, the
  // combine's fingerprint (ll_kernels.h).
  const uint64_t off_waited = 16, off_fp = off_waited + 8ull * uint64_t(R);
  const uint64_t off_counts = off_fp + 8, off_slots = core::align_up(off_counts + 4ull * uint64_t(w.num_experts), 16);
  const uint64_t bytes = off_slots + 4ull * uint64_t(std::max<int64_t>(w.num_tokens, 1)) * uint64_t(std::max(w.topk, 1));
  SY_TRY(be.allocate_output(rank, stream, bytes, OutputWritten::Partly, &call->scratch));
  auto* base = static_cast<uint8_t*>(call->scratch->ptr);
  a.s.state = reinterpret_cast<int32_t*>(base);
  a.s.waited = reinterpret_cast<int64_t*>(base + off_waited);
  a.s.fingerprint = reinterpret_cast<uint64_t*>(base + off_fp);
  a.s.counts = reinterpret_cast<int32_t*>(base + off_counts);
  a.s.slots = reinterpret_cast<int32_t*>(base + off_slots);

  LLHandle& h = *w.handle;
  if (dispatch) {
    auto hm = std::make_shared<LLHandleMemory>();
    SY_TRY(be.allocate_output(rank, stream, sizeof(LLHandleState), OutputWritten::Entirely, &hm->memory));
    hm->report = call->report;
    hm->call = w.call;
    hm->rank = buf.rank;
    h.backend_state = hm;
  }
  if (!h.backend_state) return invalid("handle", "handle: comes from another backend");
  auto handle = std::static_pointer_cast<LLHandleMemory>(h.backend_state);
  a.handle = static_cast<LLHandleState*>(handle->memory->ptr);

  a.voided_call = w.ack_voided_call;
  a.topk = w.topk;
  a.tokens = w.num_tokens;
  a.fp8 = w.fp8;
  a.round_scale = w.round_scale;
  a.ue8m0 = w.ue8m0;
  a.logfmt = w.logfmt;
  a.zero_copy = w.zero_copy;
  a.format = dispatch ? core::ll_dispatch_format(w.fp8, w.ue8m0) : core::ll_combine_format(w.logfmt);
  a.idx = w.topk_idx->data();
  a.idx_st = stride_bytes(w.topk_idx, 0);
  a.idx_sk = stride_bytes(w.topk_idx, 1);
  a.idx_i64 = w.topk_idx->dtype == core::DType::I64 ? 1 : 0;
  a.src_info = reinterpret_cast<int32_t*>(h.src_info->data());
  a.layout_range = reinterpret_cast<int64_t*>(h.layout_range->data());
  a.wait_stats = w.wait_stats ? reinterpret_cast<int64_t*>(w.wait_stats->data()) : nullptr;
  if (dispatch) {
    a.x = w.x->data();
    a.x_stride = stride_bytes(w.x, 0);
    a.recv_x = w.recv_x->data();
    a.recv_scales = w.recv_x_scales ? reinterpret_cast<uint32_t*>(w.recv_x_scales->data()) : nullptr;
    a.recv_count = reinterpret_cast<int32_t*>(w.recv_count->data());
    a.expert_stats = w.expert_stats ? reinterpret_cast<int32_t*>(w.expert_stats->data()) : nullptr;
  } else {
    a.weights = w.topk_weights->data();
    a.w_st = stride_bytes(w.topk_weights, 0);
    a.w_sk = stride_bytes(w.topk_weights, 1);
    a.y = w.zero_copy ? nullptr : w.x->data();
    a.out = w.out->data();
    a.out_stride = stride_bytes(w.out, 0);
  }

  const int me = buf.rank;
  const uint32_t n = w.call;
  std::shared_ptr<ReportSlot> report = call->report;
  w.status->check_after = [report, me, n, dispatch, handle]() {
    return ll_report_error(*report->host, me, n, dispatch, handle.get());
  };
  SY_CUDA(launch_ll_send(a, dispatch, grid_of(buf), stream.raw()));
  SY_TRY(report->seal(stream.raw()));
  w.backend_state = call;
  return ok();
}

Error ll_receive(BufferCore& buf, CudaStream& stream, const std::shared_ptr<LLWork>& work, bool dispatch) {
  auto call = std::static_pointer_cast<LLCall>(work->backend_state);
  if (!call) return fail(SY_ERROR_INTERNAL, "low-latency receive without its send phase");
  SY_CUDA(cudaSetDevice(stream.rank_state_ref().device));
  SY_CUDA(launch_ll_receive(call->args, dispatch, grid_of(buf), stream.raw()));
  SY_TRY(call->report->seal(stream.raw()));
  work->backend_state.reset();  // the scratch goes once the kernels are done (device_memory.h)
  return ok();
}

Error ll_reject(BufferCore& buf, CudaStream& stream, const std::shared_ptr<LLWork>& work, bool dispatch) {
  std::shared_ptr<ReportSlot> report;
  SY_TRY(stream.rank_state_ref().reports->take(&report));
  LLArgs a;
  SY_TRY(base_args(buf, stream, dispatch ? "low-latency dispatch" : "low-latency combine", work->call, work->half,
                   report->device, &a));
  a.voided_call = work->ack_voided_call;
  SY_CUDA(launch_ll_reject(a, dispatch, stream.raw()));
  return report->seal(stream.raw());  // nobody reads it: the refusal was reported to the caller
}

Error ll_clean(BufferCore& buf, CudaStream& stream, uint32_t epoch, const std::shared_ptr<OpStatus>& status) {
  std::shared_ptr<ReportSlot> report;
  SY_TRY(stream.rank_state_ref().reports->take(&report));
  LLArgs a;
  SY_TRY(base_args(buf, stream, "cleanLowLatencyBuffer", epoch, 0, report->device, &a));
  const int me = buf.rank;
  // A failure of the second barrier is at epoch + 1, which its timeouts and stamps carry.
  status->check_after = [report, me, epoch]() {
    const KernelReport& r = *report->host;
    if (__atomic_load_n(&r.fail_flag, __ATOMIC_ACQUIRE) == 1 && r.fail_kind == int32_t(KernelFailure::Timeout)) {
      return timeout_report_error(r, me, uint32_t(r.expected));
    }
    return report_error(r, me, epoch, "cleanLowLatencyBuffer");
  };
  SY_CUDA(launch_ll_clean(a, stream.raw()));
  return report->seal(stream.raw());
}

}  // namespace sy::cuda
