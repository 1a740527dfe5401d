// Low-latency mode on the host backend.
//
// Dispatch, call n on half h = n % 2 of every buffer:
//   send     each token is quantised once (FP8) or kept (BF16); every top-k entry takes the next
//            slot of its expert for this source and is written into the owner's
//            [local expert][source][slot] message; then, per destination, the counts of its
//            experts and the flag (= n). No waiting.
//   receive  wait for every unmasked source's flag; pack the messages per local expert, sources
//            ascending (the layout range is (begin, count) per source), scales column-major;
//            check the flags again, so a half overwritten meanwhile is an error, not data.
// Combine, call n' on half h':
//   send     every received row goes back to its source rank, keyed by [global expert][token]
//            (the receiver needs only its own top-k to find it), BF16 or LogFMT-10; then flags.
//   receive  wait; out[t] = sum over valid top-k entries, in order, of w * y (float32, each
//            product and sum rounded, core/fparith.h); one rounding to BF16.
// Masked ranks are neither sent to nor waited for; with masking, a rank missing at the deadline
// is masked instead of failing the call.
#include "host_ll.h"

#include <cstring>
#include <string>
#include <vector>

#include "../core/dtype.h"
#include "../core/fparith.h"
#include "../core/logfmt.h"
#include "../core/quant.h"
#include "../core/routing.h"
#include "futex.h"
#include "peers.h"

namespace sy::host {

namespace {

uint32_t dispatch_format(const LLWork& w) { return (w.fp8 ? 1u : 0u) | (w.ue8m0 ? 2u : 0u); }

std::string format_name(uint32_t f) {
  return (f & 1u) ? ((f & 2u) ? "FP8 with UE8M0 scales" : "FP8 with f32 scales") : "BF16";
}

int64_t load_index(const Tensor& t, int64_t i, int64_t j) {
  return t.dtype == core::DType::I64 ? *t.at<int64_t>(i, j) : int64_t(*t.at<int32_t>(i, j));
}

uint32_t* mask_of(BufferSet& set, int rank) {
  return reinterpret_cast<uint32_t*>(set.bases[size_t(rank)] + set.plan.off_mask);
}

bool masked(const uint32_t* mask, int r) { return load_acquire(&mask[r]) != 0; }

// Runs one rank's stage; failures the peers would otherwise wait out are sent to them.
template <class Body>
Error stage(BufferSet& set, const LLWork& w, Body body) {
  Peers peers(set, w.rank, w.timeout_ms, w.call);
  Error e = body(peers);
  if (e && e.status != SY_ERROR_PEER_FAILED && !e.peers_informed) peers.abort_all(e);
  return e;
}

Error check_topk(const LLWork& w) {
  const Tensor& topk = *w.topk_idx;
  for (int64_t t = 0; t < w.num_tokens; ++t) {
    int bad = -1;
    auto at = [&](int k) { return load_index(topk, t, k); };
    core::TopkProblem p = core::check_topk_row(at, w.topk, w.num_experts, &bad);
    if (p == core::TopkProblem::None) continue;
    std::string what = p == core::TopkProblem::OutOfRange
                           ? " holds expert " + std::to_string(at(bad)) + ", outside [0, " +
                                 std::to_string(w.num_experts) + ")"
                           : " repeats expert " + std::to_string(at(bad));
    return invalid("topkIdx", "topkIdx: token " + std::to_string(t) + ", entry " + std::to_string(bad) + what);
  }
  return ok();
}

// After reading a half: every source it was read from must still be at this call.
Error check_not_overwritten(Peers& peers, uint64_t off_flags, const uint32_t* mask, const char* what) {
  for (int r = 0; r < peers.num_ranks(); ++r) {
    if (masked(mask, r)) continue;
    uint32_t f = peers.flag_from(r, off_flags);
    if (f != peers.epoch()) {
      return fail(SY_ERROR_INVALID_ARGUMENT,
                  std::string(what) + " of low-latency call " + std::to_string(peers.epoch()) + " at rank " +
                      std::to_string(peers.rank()) + " was overwritten by rank " + std::to_string(r) +
                      "'s call " + std::to_string(f) +
                      ": only two low-latency results can be in flight (run each receive hook before the "
                      "call after next)",
                  "hook");
    }
  }
  return ok();
}

}  // namespace

Error run_ll_dispatch_send(BufferSet& set, LLWork& w) {
  Error e = stage(set, w, [&](Peers& peers) -> Error {
    SY_TRY(peers.wait_joined());
    SY_TRY(check_topk(w));
    const core::LowLatencyPlan& ll = set.plan.ll;
    const int R = w.num_ranks, EL = w.num_local_experts, H = w.hidden, me = w.rank;
    const uint64_t half = ll.half(w.half);
    const uint32_t* mask = mask_of(set, me);
    const int blocks = H / core::kScaleBlock;
    const int words = core::ll_scale_words(H, w.ue8m0);
    const int payload = w.fp8 ? H : 2 * H;
    std::vector<int32_t> count(size_t(w.num_experts), 0);
    std::vector<uint8_t> q(static_cast<size_t>(H));
    std::vector<uint32_t> scales(static_cast<size_t>(words));
    for (int64_t t = 0; t < w.num_tokens; ++t) {
      const auto* x = reinterpret_cast<const uint16_t*>(w.x->element(t));
      const uint8_t* body = reinterpret_cast<const uint8_t*>(x);
      if (w.fp8) {  // quantised once per token, not per expert
        std::fill(scales.begin(), scales.end(), 0u);
        for (int b = 0; b < blocks; ++b) {
          const uint16_t* blk = x + b * core::kScaleBlock;
          core::BlockScale bs = core::fp8_block_scale(core::bf16_block_amax(blk, core::kScaleBlock), w.round_scale);
          for (int c = 0; c < core::kScaleBlock; ++c) q[size_t(b * core::kScaleBlock + c)] = core::fp8_quantize(blk[c], bs.scale);
          if (w.ue8m0) {
            scales[size_t(b / 4)] |= uint32_t(core::ue8m0_of(bs.scale_inv)) << (8 * (b % 4));
          } else {
            scales[size_t(b)] = core::float_bits(bs.scale_inv);
          }
        }
        body = q.data();
      }
      for (int k = 0; k < w.topk; ++k) {
        const int64_t e = load_index(*w.topk_idx, t, k);
        if (e < 0) continue;
        const int d = core::expert_owner(e, EL);
        if (masked(mask, d)) continue;
        const int32_t slot = count[size_t(e)]++;
        uint8_t* msg = peers.base(d) + half + ll.msg(int(e - int64_t(d) * EL), me, slot);
        const int32_t src = int32_t(t);
        std::memcpy(msg, &src, 4);
        std::memcpy(msg + ll.msg_payload, body, size_t(payload));
        if (w.fp8) std::memcpy(msg + ll.msg_scales, scales.data(), 4 * size_t(words));
      }
    }
    for (int d = 0; d < R; ++d) {
      if (masked(mask, d)) continue;
      auto* counts = reinterpret_cast<int32_t*>(peers.base(d) + half + ll.off_dispatch_count);
      for (int l = 0; l < EL; ++l) counts[size_t(l) * R + me] = count[size_t(d) * EL + l];
      reinterpret_cast<uint32_t*>(peers.base(d) + half + ll.off_dispatch_format)[me] = dispatch_format(w);
      peers.signal(d, half + ll.off_dispatch_flag);
    }
    return ok();
  });
  w.sent.store(!e);
  return e;
}

Error run_ll_dispatch_recv(BufferSet& set, LLWork& w) {
  if (!w.sent.load()) return ok();  // the send phase failed and said so
  return stage(set, w, [&](Peers& peers) -> Error {
    const core::LowLatencyPlan& ll = set.plan.ll;
    const int R = w.num_ranks, EL = w.num_local_experts, me = w.rank;
    const int64_t N = ll.recv_rows();
    const uint64_t half = ll.half(w.half);
    uint32_t* mask = mask_of(set, me);
    std::vector<int64_t> waited(size_t(R), 0);
    Peers::WaitPolicy policy{mask, w.masking, waited.data()};
    SY_TRY(peers.wait_sources(half + ll.off_dispatch_flag, core::WaitRole::LLDispatch, policy));

    uint8_t* base = peers.base(me) + half;
    const auto* counts = reinterpret_cast<const int32_t*>(base + ll.off_dispatch_count);
    const auto* formats = reinterpret_cast<const uint32_t*>(base + ll.off_dispatch_format);
    for (int s = 0; s < R; ++s) {
      if (masked(mask, s) || formats[s] == dispatch_format(w)) continue;
      Error e = invalid("useFp8", "useFp8: rank " + std::to_string(s) + " sent " + format_name(formats[s]) +
                                      " tokens but rank " + std::to_string(me) + " expects " +
                                      format_name(dispatch_format(w)) + "; every rank must pass the same options");
      e.peers_informed = true;  // each receiver sees the mismatch itself
      return e;
    }
    const int payload = w.fp8 ? w.hidden : 2 * w.hidden;
    const int words = w.fp8 ? core::ll_scale_words(w.hidden, w.ue8m0) : 0;
    auto* src_info = reinterpret_cast<int32_t*>(w.handle->src_info->data());
    auto* range = reinterpret_cast<int64_t*>(w.handle->layout_range->data());
    auto* recv_count = reinterpret_cast<int32_t*>(w.recv_count->data());
    for (int l = 0; l < EL; ++l) {
      int64_t begin = 0;
      for (int s = 0; s < R; ++s) {
        const int32_t c = masked(mask, s) ? 0 : counts[size_t(l) * R + s];
        range[size_t(l) * R + s] = (begin << 32) | int64_t(uint32_t(c));
        for (int32_t i = 0; i < c; ++i) {
          const uint8_t* msg = base + ll.msg(l, s, i);
          const int64_t row = begin + i;
          std::memcpy(w.recv_x->element_at({l, row}), msg + ll.msg_payload, size_t(payload));
          for (int j = 0; j < words; ++j) {
            // [EL, N, S], column-major in the last two dimensions (the tensor's strides say so).
            std::memcpy(w.recv_x_scales->element_at({l, row, j}), msg + ll.msg_scales + 4 * j, 4);
          }
          std::memcpy(&src_info[size_t(l) * N + size_t(row)], msg, 4);
        }
        begin += c;
      }
      recv_count[l] = int32_t(begin);
      if (w.expert_stats) *w.expert_stats->at<int32_t>(l) += int32_t(begin);
    }
    SY_TRY(check_not_overwritten(peers, half + ll.off_dispatch_flag, mask, "the dispatch data"));
    if (w.wait_stats)
      for (int s = 0; s < R; ++s) *w.wait_stats->at<int64_t>(s) += waited[size_t(s)];
    w.handle->received.store(true);
    return ok();
  });
}

Error run_ll_combine_send(BufferSet& set, LLWork& w) {
  Error e = stage(set, w, [&](Peers& peers) -> Error {
    SY_TRY(peers.wait_joined());
    LLHandle& h = *w.handle;
    if (!h.received.load()) {
      return invalid("handle", "handle: the receive phase of low-latency call " + std::to_string(h.call) +
                                   " has not run; run its hook before combining");
    }
    const core::LowLatencyPlan& ll = set.plan.ll;
    const int R = w.num_ranks, EL = w.num_local_experts, H = w.hidden, me = w.rank;
    const int64_t N = ll.recv_rows();
    const uint64_t half = ll.half(w.half);
    const uint32_t* mask = mask_of(set, me);
    const auto* src_info = reinterpret_cast<const int32_t*>(h.src_info->data());
    const auto* range = reinterpret_cast<const int64_t*>(h.layout_range->data());
    const int blocks = H / core::kScaleBlock;
    for (int l = 0; l < EL; ++l) {
      const int64_t e = int64_t(me) * EL + l;
      for (int s = 0; s < R; ++s) {
        if (masked(mask, s)) continue;
        const int64_t rs = range[size_t(l) * R + s];
        const int64_t begin = rs >> 32, c = rs & 0xffffffff;
        for (int64_t i = 0; i < c; ++i) {
          const int64_t row = begin + i;
          const auto* y = w.zero_copy
                              ? reinterpret_cast<const uint16_t*>(peers.base(me) + half + ll.send_row(l, row))
                              : reinterpret_cast<const uint16_t*>(w.x->element_at({l, row}));
          uint8_t* dst = peers.base(s) + half + ll.combine_row(e, src_info[size_t(l) * N + size_t(row)]);
          if (!w.logfmt) {
            std::memcpy(dst, y, size_t(H) * 2);
            continue;
          }
          auto* meta = reinterpret_cast<uint16_t*>(dst + ll.row_meta);
          for (int b = 0; b < blocks; ++b) {
            const uint16_t* blk = y + b * core::kScaleBlock;
            uint8_t* out = dst + b * core::kScaleBlock * 2;
            core::LogfmtMeta m = core::logfmt_plan(blk, core::kScaleBlock);
            meta[2 * b] = m.m_min;
            meta[2 * b + 1] = m.step;
            if (m.step == 0) {
              std::memcpy(out, blk, core::kScaleBlock * 2);
              continue;
            }
            std::memset(out, 0, core::kLogfmtBlockBytes);
            for (int c2 = 0; c2 < core::kScaleBlock; ++c2) core::logfmt_put(out, c2, core::logfmt_code(blk[c2], m));
          }
        }
      }
    }
    for (int s = 0; s < R; ++s) {
      if (masked(mask, s)) continue;
      store_release(reinterpret_cast<uint32_t*>(peers.base(s) + half + ll.off_combine_format) + me, w.logfmt ? 1u : 0u);
      peers.signal(s, half + ll.off_combine_flag);
    }
    return ok();
  });
  w.sent.store(!e);
  return e;
}

Error run_ll_combine_recv(BufferSet& set, LLWork& w) {
  if (!w.sent.load()) return ok();
  return stage(set, w, [&](Peers& peers) -> Error {
    const core::LowLatencyPlan& ll = set.plan.ll;
    const int R = w.num_ranks, EL = w.num_local_experts, H = w.hidden, me = w.rank;
    const uint64_t half = ll.half(w.half);
    uint32_t* mask = mask_of(set, me);
    std::vector<int64_t> waited(size_t(R), 0);
    Peers::WaitPolicy policy{mask, w.masking, waited.data()};
    SY_TRY(peers.wait_sources(half + ll.off_combine_flag, core::WaitRole::LLCombine, policy));
    const uint8_t* base = peers.base(me) + half;
    const auto* formats = reinterpret_cast<const uint32_t*>(base + ll.off_combine_format);
    for (int s = 0; s < R; ++s) {
      if (!masked(mask, s) && load_acquire(&formats[s]) != (w.logfmt ? 1u : 0u)) {
        Error e = invalid("useLogfmt", "useLogfmt: rank " + std::to_string(s) + (w.logfmt ? " did not use" : " used") +
                                           " LogFMT-10 in this combine but rank " + std::to_string(me) +
                                           (w.logfmt ? " did" : " did not"));
        e.peers_informed = true;
        return e;
      }
    }
    const int blocks = H / core::kScaleBlock;
    std::vector<float> acc(static_cast<size_t>(H));
    std::vector<uint16_t> row(static_cast<size_t>(H));
    for (int64_t t = 0; t < w.num_tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int k = 0; k < w.topk; ++k) {
        const int64_t e = load_index(*w.topk_idx, t, k);
        if (e < 0 || masked(mask, core::expert_owner(e, EL))) continue;
        const float weight = *w.topk_weights->at<float>(t, k);
        const uint8_t* src = base + ll.combine_row(e, t);
        const uint16_t* y = reinterpret_cast<const uint16_t*>(src);
        if (w.logfmt) {
          const auto* meta = reinterpret_cast<const uint16_t*>(src + ll.row_meta);
          for (int b = 0; b < blocks; ++b) {
            const core::LogfmtMeta m{meta[2 * b], meta[2 * b + 1]};
            const uint8_t* blk = src + b * core::kScaleBlock * 2;
            for (int c = 0; c < core::kScaleBlock; ++c) {
              row[size_t(b * core::kScaleBlock + c)] =
                  m.step == 0 ? reinterpret_cast<const uint16_t*>(blk)[c] : core::logfmt_decode(core::logfmt_get(blk, c), m);
            }
          }
          y = row.data();
        }
        for (int c = 0; c < H; ++c) acc[size_t(c)] = core::add_rn(acc[size_t(c)], core::mul_rn(weight, core::bf16_to_float(y[c])));
      }
      auto* out = reinterpret_cast<uint16_t*>(w.out->element(t));
      for (int c = 0; c < H; ++c) out[c] = core::float_to_bf16(acc[size_t(c)]);
    }
    SY_TRY(check_not_overwritten(peers, half + ll.off_combine_flag, mask, "the combine data"));
    if (w.wait_stats)
      for (int s = 0; s < R; ++s) *w.wait_stats->at<int64_t>(s) += waited[size_t(s)];
    return ok();
  });
}

Error run_ll_clean(BufferSet& set, int rank, int64_t timeout_ms, uint32_t epoch) {
  // Everyone stops using the halves, each rank zeroes its own signals, everyone resumes.
  Peers before(set, rank, timeout_ms, epoch);
  Error e = before.barrier(core::OpKind::CleanLowLatency);
  if (e) {
    if (e.status != SY_ERROR_PEER_FAILED && !e.peers_informed) before.abort_all(e);
    return e;
  }
  const core::LowLatencyPlan& ll = set.plan.ll;
  for (int h = 0; h < 2; ++h) std::memset(set.bases[size_t(rank)] + ll.half(h), 0, ll.signal_bytes);
  Peers after(set, rank, timeout_ms, epoch + 1);
  e = after.barrier(core::OpKind::CleanLowLatency);
  if (e && e.status != SY_ERROR_PEER_FAILED) after.abort_all(e);
  return e;
}

}  // namespace sy::host
