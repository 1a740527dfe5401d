// Low-latency mode on the host backend.
//
// Dispatch, call n on half h = n % 2 of every buffer:
//   send     wait until every destination has finished reading its previous use of half h
//            (call n - 2: it acknowledges into the sender's half); then each token is quantised
//            once (FP8) or kept (BF16), every top-k entry takes the next slot of its expert for
//            this source and is written into the owner's [local expert][source][slot] message;
//            then, per destination, the counts of its experts, the format word and the flag (= n).
//   receive  wait for every unmasked source's flag; pack the messages per local expert, sources
//            ascending (the layout range is (begin, count) per source), scales column-major;
//            check the flags again; acknowledge to every source.
// Combine, call n' on half h':
//   send     the same acknowledgement wait; every received row goes back to its source rank,
//            keyed by [global expert][token] (the receiver needs only its own top-k to find
//            it), BF16 or LogFMT-10; then format and flag.
//   receive  wait; out[t] = sum over valid top-k entries, in order, of w * y (float32, each
//            product and sum rounded, core/fparith.h); one rounding to BF16; acknowledge.
// Masked ranks are neither sent to nor waited for; with masking, a rank missing at a deadline is
// masked instead of failing the call. Input a rank finds invalid, inside the send phase or before
// it (a refused call: run_ll_*_reject), is announced in its format word: that call fails on
// every rank, and the buffers stay usable.
#include "host_ll.h"

#include <cstring>
#include <string>
#include <vector>

#include "../core/dtype.h"
#include "../core/fparith.h"
#include "../core/logfmt.h"
#include "../core/quant.h"
#include "../core/routing.h"
#include "../abi/protocol_errors.h"
#include "futex.h"
#include "peers.h"
#include "populate.h"

namespace sy::host {

namespace {

uint32_t dispatch_format(const LLWork& w) {
  return core::ll_dispatch_format(w.fp8, w.ue8m0);
}

int64_t load_index(const Tensor& t, int64_t i, int64_t j) {
  return t.dtype == core::DType::I64 ? *t.at<int64_t>(i, j) : int64_t(*t.at<int32_t>(i, j));
}

uint32_t* mask_of(BufferSet& set, int rank) {
  return reinterpret_cast<uint32_t*>(set.bases[size_t(rank)] + set.plan.off_mask);
}

bool masked(const uint32_t* mask, int r) { return load_acquire(&mask[r]) != 0; }

// A failure every rank learns of by itself, or one the peers need not hear about.
Error local(Error e) {
  e.peers_informed = true;
  return e;
}

// Runs one rank's stage; failures the peers would otherwise wait out are sent to them.
template <class Body>
Error stage(BufferSet& set, const LLWork& w, Body body) {
  Peers peers(set, w.rank, w.timeout_ms, w.call);
  Error e = body(peers);
  if (e && e.status != SY_ERROR_PEER_FAILED && !e.peers_informed) peers.abort_all(e);
  return e;
}

// Every row of top-k ids: -1 or an expert in range, no expert twice.
Error check_topk(const LLWork& w) {
  const Tensor& topk = *w.topk_idx;
  for (int64_t t = 0; t < w.num_tokens; ++t) {
    int bad = -1;
    auto at = [&](int k) { return load_index(topk, t, k); };
    core::TopkProblem p = core::check_topk_row(at, w.topk, w.num_experts, &bad);
    if (p != core::TopkProblem::None) return topk_problem_error(p, t, bad, at(bad), w.num_experts);
  }
  return ok();
}

// A fingerprint of a top-k tensor (FNV-1a over its values), so combine can tell that it was
// given the routing of its dispatch.
uint64_t topk_fingerprint(const LLWork& w) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](uint64_t v) {
    for (int i = 0; i < 8; ++i) h = (h ^ ((v >> (8 * i)) & 0xffu)) * 1099511628211ull;
  };
  mix(uint64_t(w.num_tokens));
  mix(uint64_t(w.topk));
  for (int64_t t = 0; t < w.num_tokens; ++t)
    for (int k = 0; k < w.topk; ++k) mix(uint64_t(load_index(*w.topk_idx, t, k)));
  return h;
}

// After reading (or deciding not to read) this half: tell every unmasked source.
void acknowledge(Peers& peers, uint64_t half, const uint32_t* mask) {
  for (int s = 0; s < peers.num_ranks(); ++s)
    if (!masked(mask, s)) peers.signal(s, half + peers.plan().ll.off_consumed);
}

// Before writing into the peers' half for call n: each unmasked peer has read that half's
// previous call (n - 2) and said so.
Error wait_consumed(BufferSet& set, const LLWork& w, uint64_t half, uint32_t* mask) {
  if (w.ack_voided_call) {  // this rank gave up that call's data: the senders may overwrite it
    Peers voided(set, w.rank, w.timeout_ms, w.ack_voided_call);
    acknowledge(voided, half, mask);
  }
  if (w.call <= 2) return ok();
  Peers previous(set, w.rank, w.timeout_ms, w.call - 2);
  return previous.wait_sources(half + set.plan.ll.off_consumed, core::WaitRole::LLDispatch,
                               Peers::WaitPolicy{mask, w.masking, nullptr});
}

// After reading a half: every source it was read from must still be at this call.
Error check_not_overwritten(Peers& peers, uint64_t off_flags, const uint32_t* mask, const char* what) {
  for (int r = 0; r < peers.num_ranks(); ++r) {
    if (masked(mask, r)) continue;
    if (uint32_t f = peers.flag_from(r, off_flags); f != peers.epoch()) {
      return ll_overwritten_error(peers.rank(), r, what, peers.epoch(), f);
    }
  }
  return ok();
}

// The sources' format words must match this rank's, and none may have rejected its input.
Error check_formats(Peers& peers, const uint32_t* formats, const uint32_t* mask, uint32_t mine, const char* op) {
  for (int s = 0; s < peers.num_ranks(); ++s) {
    if (masked(mask, s)) continue;
    const uint32_t f = load_acquire(&formats[s]);
    if (f & core::kFormatRejected) return ll_peer_rejected_error(peers.rank(), s, op, peers.epoch());
    if (f != mine) return ll_format_error(peers.rank(), s, op, f, mine);
  }
  return ok();
}

// Tells every unmasked destination that this rank rejected its own input for this call.
void announce_rejection(Peers& peers, uint64_t half, uint64_t off_format, uint64_t off_flag, const uint32_t* mask,
                        const core::LowLatencyPlan* counts_of) {
  for (int d = 0; d < peers.num_ranks(); ++d) {
    if (masked(mask, d)) continue;
    if (counts_of) {
      auto* counts = reinterpret_cast<int32_t*>(peers.base(d) + half + counts_of->off_dispatch_count);
      for (int l = 0; l < counts_of->local_experts; ++l) counts[size_t(l) * peers.num_ranks() + peers.rank()] = 0;
    }
    reinterpret_cast<uint32_t*>(peers.base(d) + half + off_format)[peers.rank()] = core::kFormatRejected;
    peers.signal(d, half + off_flag);
  }
}

// A call this rank refused before its send phase, with its call number and half: the rejection
// goes where its data would have gone, then the half is received as a rejected call's receive
// phase receives it, for the acknowledgement alone.
Error reject_call(BufferSet& set, LLWork& w, uint64_t off_format, uint64_t off_flag, core::WaitRole role,
                  const core::LowLatencyPlan* counts_of) {
  return stage(set, w, [&](Peers& peers) -> Error {
    const uint64_t half = set.plan.ll.half(w.half);
    uint32_t* mask = mask_of(set, w.rank);
    SY_TRY(peers.wait_joined(w.masking ? mask : nullptr));
    SY_TRY(wait_consumed(set, w, half, mask));
    announce_rejection(peers, half, off_format, off_flag, mask, counts_of);
    SY_TRY(peers.wait_sources(half + off_flag, role, Peers::WaitPolicy{mask, w.masking, nullptr}));
    acknowledge(peers, half, mask);
    return ok();
  });
}

}  // namespace

Error run_ll_dispatch_reject(BufferSet& set, LLWork& w) {
  const core::LowLatencyPlan& ll = set.plan.ll;
  return reject_call(set, w, ll.off_dispatch_format, ll.off_dispatch_flag, core::WaitRole::LLDispatch, &ll);
}

Error run_ll_combine_reject(BufferSet& set, LLWork& w) {
  const core::LowLatencyPlan& ll = set.plan.ll;
  return reject_call(set, w, ll.off_combine_format, ll.off_combine_flag, core::WaitRole::LLCombine, nullptr);
}

Error run_ll_dispatch_send(BufferSet& set, LLWork& w) {
  Error e = stage(set, w, [&](Peers& peers) -> Error {
    const core::LowLatencyPlan& ll = set.plan.ll;
    const int R = w.num_ranks, EL = w.num_local_experts, H = w.hidden, me = w.rank;
    const uint64_t half = ll.half(w.half);
    uint32_t* mask = mask_of(set, me);
    SY_TRY(peers.wait_joined(w.masking ? mask : nullptr));
    SY_TRY(wait_consumed(set, w, half, mask));
    if (Error bad = check_topk(w)) {
      announce_rejection(peers, half, ll.off_dispatch_format, ll.off_dispatch_flag, mask, &ll);
      w.send_state = LLWork::kSendRejected;
      return local(bad);
    }
    w.handle->topk_fingerprint = topk_fingerprint(w);
    const int blocks = H / core::kScaleBlock;
    const int words = core::ll_scale_words(H, w.ue8m0);
    const int payload = w.fp8 ? H : 2 * H;
    std::vector<int32_t> count(size_t(w.num_experts), 0);
    // Each destination expert's slots from this rank are one dense range of its buffer, written
    // from slot 0 up: committed up front (populate.h), which on the first calls of a buffer
    // costs a fraction of the page faults the copies would take.
    for (int64_t t = 0; t < w.num_tokens; ++t)
      for (int k = 0; k < w.topk; ++k)
        if (const int64_t e = load_index(*w.topk_idx, t, k); e >= 0) ++count[size_t(e)];
    for (int64_t e = 0; e < w.num_experts; ++e) {
      const int d = core::expert_owner(e, EL);
      if (count[size_t(e)] == 0 || masked(mask, d)) continue;
      populate_for_write(peers.base(d) + half + ll.msg(int(e - int64_t(d) * EL), me, 0),
                         size_t(count[size_t(e)]) * size_t(ll.msg_bytes));
    }
    std::fill(count.begin(), count.end(), 0);
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
        const int32_t slot = count[size_t(e)]++;  // < T <= max_tokens: experts appear once per token
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
      peers.signal(d, half + ll.off_dispatch_flag);  // release: messages, counts and format first
    }
    return ok();
  });
  if (e && w.send_state != LLWork::kSendRejected) w.send_state = LLWork::kSendAborted;
  return e;
}

Error run_ll_dispatch_recv(BufferSet& set, LLWork& w) {
  if (w.send_state == LLWork::kSendAborted) return ok();  // the peers were told; nothing arrives
  return stage(set, w, [&](Peers& peers) -> Error {
    const core::LowLatencyPlan& ll = set.plan.ll;
    const int R = w.num_ranks, EL = w.num_local_experts, me = w.rank;
    const int64_t N = ll.recv_rows();
    const uint64_t half = ll.half(w.half);
    uint32_t* mask = mask_of(set, me);
    std::vector<int64_t> waited(size_t(R), 0);
    SY_TRY(peers.wait_sources(half + ll.off_dispatch_flag, core::WaitRole::LLDispatch,
                              Peers::WaitPolicy{mask, w.masking, waited.data()}));
    uint8_t* base = peers.base(me) + half;
    Error e = w.send_state == LLWork::kSendRejected
                  ? local(fail(SY_ERROR_INVALID_ARGUMENT, "this rank rejected its input (see its dispatch error)"))
                  : check_formats(peers, reinterpret_cast<const uint32_t*>(base + ll.off_dispatch_format), mask,
                                  dispatch_format(w), "dispatch");
    if (!e) {
      const auto* counts = reinterpret_cast<const int32_t*>(base + ll.off_dispatch_count);
      const int payload = w.fp8 ? w.hidden : 2 * w.hidden;
      const int words = w.fp8 ? core::ll_scale_words(w.hidden, w.ue8m0) : 0;
      auto* src_info = reinterpret_cast<int32_t*>(w.handle->src_info->data());
      auto* range = reinterpret_cast<int64_t*>(w.handle->layout_range->data());
      auto* recv_count = reinterpret_cast<int32_t*>(w.recv_count->data());
      std::vector<int32_t> source_counts(size_t(R), 0);
      for (int l = 0; l < EL && !e; ++l) {
        int64_t rows = 0;
        for (int s = 0; s < R && !e; ++s) {  // read once: a peer's memory is validated, then used
          const int32_t c = source_counts[size_t(s)] = masked(mask, s) ? 0 : counts[size_t(l) * R + s];
          if (c < 0 || c > ll.max_tokens) e = ll_count_error(s, c);
          rows += c;
        }
        if (e) break;
        // The expert's rows are one dense range of the output (a fresh mapping: see populate.h).
        if (rows > 0) populate_for_write(w.recv_x->element_at({l, 0}), size_t(rows) * size_t(payload));
        int64_t begin = 0;
        for (int s = 0; s < R; ++s) {
          const int32_t c = source_counts[size_t(s)];
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
      }
      if (!e) e = check_not_overwritten(peers, half + ll.off_dispatch_flag, mask, "the dispatch data");
    }
    acknowledge(peers, half, mask);  // read or not, the half is free for the senders again
    SY_TRY(e);
    // Statistics count only calls that delivered.
    const auto* recv_count = reinterpret_cast<const int32_t*>(w.recv_count->data());
    if (w.expert_stats)
      for (int l = 0; l < EL; ++l) *w.expert_stats->at<int32_t>(l) += recv_count[l];
    if (w.wait_stats)
      for (int s = 0; s < R; ++s) *w.wait_stats->at<int64_t>(s) += waited[size_t(s)];
    w.handle->received.store(true);
    return ok();
  });
}

Error run_ll_combine_send(BufferSet& set, LLWork& w) {
  Error e = stage(set, w, [&](Peers& peers) -> Error {
    const core::LowLatencyPlan& ll = set.plan.ll;
    const int R = w.num_ranks, EL = w.num_local_experts, H = w.hidden, me = w.rank;
    const int64_t N = ll.recv_rows();
    const uint64_t half = ll.half(w.half);
    uint32_t* mask = mask_of(set, me);
    SY_TRY(peers.wait_joined(w.masking ? mask : nullptr));
    SY_TRY(wait_consumed(set, w, half, mask));
    LLHandle& h = *w.handle;
    const auto* src_info = reinterpret_cast<const int32_t*>(h.src_info->data());
    const auto* range = reinterpret_cast<const int64_t*>(h.layout_range->data());
    Error bad;
    if (!h.received.load()) {
      // Its dispatch failed (a peer died, say), or the caller skipped the receive hook: refused
      // like bad input, so every rank fails this combine at once and the half stays usable.
      Error failed;
      if (h.status) {
        std::lock_guard<std::mutex> l(h.status->mu);
        failed = h.status->error;
      }
      bad = ll_failed_dispatch_error(h.call, failed);
    }
    // The layout must describe rows this buffer can hold (it is the dispatch's, read-only).
    for (int l = 0; l < EL && !bad; ++l) {
      for (int s = 0; s < R && !bad; ++s) {
        const int64_t rs = range[size_t(l) * R + s], begin = rs >> 32, c = rs & 0xffffffff;
        if (begin < 0 || c > ll.max_tokens || begin + c > N) bad = invalid("handle", "handle: corrupt layout range");
        for (int64_t i = 0; i < c && !bad; ++i) {
          const int32_t t = src_info[size_t(l) * N + size_t(begin + i)];
          if (t < 0 || t >= ll.max_tokens) bad = invalid("handle", "handle: corrupt source token index");
        }
      }
    }
    if (bad) {
      announce_rejection(peers, half, ll.off_combine_format, ll.off_combine_flag, mask, nullptr);
      w.send_state = LLWork::kSendRejected;
      return local(bad);
    }
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
          populate_for_write(dst, size_t(ll.row_bytes));  // see populate.h
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
      reinterpret_cast<uint32_t*>(peers.base(s) + half + ll.off_combine_format)[me] =
          core::ll_combine_format(w.logfmt);
      peers.signal(s, half + ll.off_combine_flag);
    }
    return ok();
  });
  if (e && w.send_state != LLWork::kSendRejected) w.send_state = LLWork::kSendAborted;
  return e;
}

Error run_ll_combine_recv(BufferSet& set, LLWork& w) {
  if (w.send_state == LLWork::kSendAborted) return ok();
  return stage(set, w, [&](Peers& peers) -> Error {
    const core::LowLatencyPlan& ll = set.plan.ll;
    const int R = w.num_ranks, EL = w.num_local_experts, H = w.hidden, me = w.rank;
    const uint64_t half = ll.half(w.half);
    uint32_t* mask = mask_of(set, me);
    std::vector<int64_t> waited(size_t(R), 0);
    SY_TRY(peers.wait_sources(half + ll.off_combine_flag, core::WaitRole::LLCombine,
                              Peers::WaitPolicy{mask, w.masking, waited.data()}));
    const uint8_t* base = peers.base(me) + half;
    Error e = w.send_state == LLWork::kSendRejected
                  ? local(fail(SY_ERROR_INVALID_ARGUMENT, "this rank rejected its input (see its combine error)"))
                  : check_formats(peers, reinterpret_cast<const uint32_t*>(base + ll.off_combine_format), mask,
                                  core::ll_combine_format(w.logfmt), "combine");
    // The routing must be valid, and the one the dispatch used (rows are keyed by it).
    if (!e) e = local(check_topk(w));
    if (!e && topk_fingerprint(w) != w.handle->topk_fingerprint) e = ll_routing_mismatch_error(w.handle->call);
    if (!e) {
      const int blocks = H / core::kScaleBlock;
      std::vector<float> acc(static_cast<size_t>(H));
      std::vector<uint16_t> row(static_cast<size_t>(H));
      for (int64_t t = 0; t < w.num_tokens; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int k = 0; k < w.topk; ++k) {
          const int64_t ex = load_index(*w.topk_idx, t, k);
          if (ex < 0 || masked(mask, core::expert_owner(ex, EL))) continue;
          const float weight = *w.topk_weights->at<float>(t, k);
          const uint8_t* src = base + ll.combine_row(ex, t);
          const uint16_t* y = reinterpret_cast<const uint16_t*>(src);
          if (w.logfmt) {
            const auto* meta = reinterpret_cast<const uint16_t*>(src + ll.row_meta);
            for (int b = 0; b < blocks; ++b) {
              const core::LogfmtMeta m{meta[2 * b], meta[2 * b + 1]};
              const uint8_t* blk = src + b * core::kScaleBlock * 2;
              for (int c = 0; c < core::kScaleBlock; ++c) {
                row[size_t(b * core::kScaleBlock + c)] = m.step == 0 ? reinterpret_cast<const uint16_t*>(blk)[c]
                                                                     : core::logfmt_decode(core::logfmt_get(blk, c), m);
              }
            }
            y = row.data();
          }
          for (int c = 0; c < H; ++c)
            acc[size_t(c)] = core::add_rn(acc[size_t(c)], core::mul_rn(weight, core::bf16_to_float(y[c])));
        }
        auto* out = reinterpret_cast<uint16_t*>(w.out->element(t));
        for (int c = 0; c < H; ++c) out[c] = core::float_to_bf16(acc[size_t(c)]);
      }
      e = check_not_overwritten(peers, half + ll.off_combine_flag, mask, "the combine data");
    }
    acknowledge(peers, half, mask);
    SY_TRY(e);
    if (w.wait_stats)
      for (int s = 0; s < R; ++s) *w.wait_stats->at<int64_t>(s) += waited[size_t(s)];
    return ok();
  });
}

Error run_ll_clean(BufferSet& set, int rank, int64_t timeout_ms, bool masking, uint32_t epoch) {
  // Everyone stops using the halves, each rank zeroes its own signals, everyone resumes. Masked
  // ranks (the dead ones this is often for) are left out.
  uint32_t* mask = mask_of(set, rank);
  auto barrier = [&](uint32_t n) -> Error {
    Peers peers(set, rank, timeout_ms, n);
    Error e = masking ? peers.masked_barrier(core::OpKind::CleanLowLatency, mask, true)
                      : peers.barrier(core::OpKind::CleanLowLatency);
    if (e && e.status != SY_ERROR_PEER_FAILED && !e.peers_informed) peers.abort_all(e);
    return e;
  };
  SY_TRY(barrier(epoch));
  const core::LowLatencyPlan& ll = set.plan.ll;
  for (int h = 0; h < 2; ++h) std::memset(set.bases[size_t(rank)] + ll.half(h), 0, ll.signal_bytes);
  return barrier(epoch + 1);
}

}  // namespace sy::host
