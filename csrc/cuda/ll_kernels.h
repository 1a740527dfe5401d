// The low-latency (decode) mode on the GPU: the kernels of csrc/host/host_ll.cpp's protocol,
// with its data layout (core::LowLatencyPlan), quantisation (core/quant.h), LogFMT-10
// (core/logfmt.h) and reduction order (core/fparith.h), so both backends agree bit for bit.
//
// Every phase of a call is three launches on one stream; the stream order between them is the
// grid-wide barrier the phase needs:
//
//   send     prepare (one block)  acknowledge a voided call; wait until every destination has
//                                 read this half's previous call; check the input (dispatch:
//                                 top-k ids; combine: that the handle's dispatch delivered) and
//                                 announce a rejection instead of sending; dispatch: each top-k
//                                 entry's slot in its expert, in token order, and the per-expert
//                                 counts
//            body (grid)          dispatch: one block per token, quantised once (FP8) and written
//                                 into every destination expert's slot; combine: every received
//                                 row back to its source, keyed by [global expert][token], BF16
//                                 or LogFMT-10
//            finish (one block)   per destination: counts (dispatch), format word, then the flag
//                                 (release, after a system fence)
//   receive  prepare (one block)  wait for every unmasked source's flag (masking: mask it at the
//                                 deadline instead), timing each; check formats and rejections;
//                                 dispatch: the layout ranges and counts; combine: the top-k ids
//                                 and that they are the dispatch's
//            body (grid)          dispatch: messages into the expert-major outputs; combine: the
//                                 weighted sum of each token's rows, in top-k order
//            finish (one block)   check that no source overwrote the half meanwhile, acknowledge
//                                 to every unmasked source, add the statistics
//
// Failures go into the call's KernelReport (first one wins); a timeout also aborts the peers. A
// kernel whose call already failed does nothing, except what the protocol needs of it (the
// acknowledgement after a rejection, so the senders may reuse the half).
#pragma once

#include <cstdint>

#include "../core/plan.h"
#include "device_sync.cuh"

namespace sy::cuda {

// Threads of every low-latency kernel.
inline constexpr int kLLThreads = 512;

// Failures of the low-latency kernels beyond the normal mode's (kernel_report.h); the host
// reads them with the peer in `peer` and the values in `observed` / `expected`.
enum class LLFailure : int32_t {
  SelfRejected = 100,     // this rank rejected its own input (its report says why, or its refusal did)
  Format = 101,           // rank `peer` sent format word `observed`, this rank `expected`
  Count = 102,            // rank `peer` announced `observed` tokens for one expert
  Overwritten = 103,      // rank `peer` is at call `observed` while this rank read its data
  RoutingMismatch = 104,  // combine's top-k ids are not those its dispatch sent
  CorruptHandle = 105,    // combine: the handle's range `observed` (local expert x R + source) is out of bounds
};

// One call's device scratch, shared by its send and receive phases (the receive may run much
// later, through a hook): written by the send's prepare first.
struct LLScratch {
  int32_t* state = nullptr;     // [0] send (LLWork::kSend*), [1] receive may read, [2] receive ended
                                // at a timeout (no acknowledgement)
  int64_t* waited = nullptr;    // [R] receive: ns waited for each source
  int32_t* counts = nullptr;    // [E] dispatch send: entries per global expert
  int32_t* slots = nullptr;     // [T * K] dispatch send: slot of each entry in its expert, or -1
  uint64_t* fingerprint = nullptr;  // combine receive: of its top-k ids
};

// A low-latency handle's device state: written by its dispatch, read by its combine.
struct LLHandleState {
  uint64_t fingerprint;  // of the top-k ids dispatched
  int32_t received;      // 1 once the receive phase delivered
  int32_t reserved;
};

struct LLArgs {
  SyncArgs sync;  // rank, ranks, epoch = the call number, deadline, bases, abort record, report
  core::LowLatencyPlan ll;
  uint64_t half = 0;      // this call's half, from the buffer base
  uint64_t off_mask = 0;  // this rank's mask, from its buffer base
  uint32_t voided_call = 0;
  uint32_t format = 0;    // this rank's format word (core::kFormat*)
  int masking = 0;
  int topk = 0;
  int64_t tokens = 0;
  int fp8 = 0, round_scale = 0, ue8m0 = 0, logfmt = 0, zero_copy = 0;
  // Top-k ids [T][K] (i64 or i32, strides in bytes) and, for combine, weights [T][K] f32.
  const uint8_t* idx = nullptr;
  int64_t idx_st = 0, idx_sk = 0;
  int idx_i64 = 0;
  const uint8_t* weights = nullptr;
  int64_t w_st = 0, w_sk = 0;
  // Dispatch: x [T][H] BF16 (rows contiguous); outputs recv_x [EL][N][H], scales [EL][N][S]
  // (token dimension contiguous), counts [EL], the handle's src_info [EL][N] and ranges [EL][R].
  const uint8_t* x = nullptr;
  int64_t x_stride = 0;
  uint8_t* recv_x = nullptr;
  uint32_t* recv_scales = nullptr;
  int32_t* recv_count = nullptr;
  int32_t* src_info = nullptr;
  int64_t* layout_range = nullptr;
  int32_t* expert_stats = nullptr;  // [EL] accumulated
  int64_t* wait_stats = nullptr;    // [R] accumulated
  // Combine: expert outputs [EL][N][H] BF16 (or the own half's send rows), out [T][H].
  const uint8_t* y = nullptr;
  uint8_t* out = nullptr;
  int64_t out_stride = 0;
  LLScratch s;
  LLHandleState* handle = nullptr;
};

// The phases (`dispatch` true for dispatch, false for combine); `blocks` sizes the grid kernels.
cudaError_t launch_ll_send(const LLArgs& a, bool dispatch, int blocks, cudaStream_t stream);
cudaError_t launch_ll_receive(const LLArgs& a, bool dispatch, int blocks, cudaStream_t stream);
// A call refused on this rank before its send: acknowledge a voided call, wait for the half,
// announce the rejection, wait for the sources, acknowledge (host_ll.cpp's reject_call).
cudaError_t launch_ll_reject(const LLArgs& a, bool dispatch, cudaStream_t stream);
// cleanLowLatencyBuffer (`a.sync.epoch` the first of its two): a barrier (with masking, masked
// ranks left out and those missing at the deadline masked), this rank's signals of both halves
// zeroed, a second barrier at epoch + 1.
cudaError_t launch_ll_clean(const LLArgs& a, cudaStream_t stream);

}  // namespace sy::cuda
