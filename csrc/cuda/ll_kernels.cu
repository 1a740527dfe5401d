// The low-latency kernels (ll_kernels.h).
#include "ll_kernels.h"

#include <math.h>

#include "../core/dtype.h"
#include "../core/fparith.h"
#include "../core/logfmt.h"
#include "../core/quant.h"
#include "../core/routing.h"
#include "../abi/objects.h"

namespace sy::cuda {

namespace {

constexpr int kSendOk = LLWork::kSendOk, kSendRejected = LLWork::kSendRejected, kSendAborted = LLWork::kSendAborted;

__device__ __forceinline__ uint32_t* word_at(const LLArgs& a, int owner, uint64_t off) {
  return reinterpret_cast<uint32_t*>(a.sync.bases[owner] + off);
}

// Whether this rank has masked rank `r` (its own header; set by the host in stream order, or by
// a wait of this rank at its deadline).
__device__ __forceinline__ bool is_masked(const LLArgs& a, int r) {
  return ld_acquire_sys(word_at(a, a.sync.rank, a.off_mask + 4ull * uint64_t(r))) != 0u;
}

__device__ __forceinline__ int64_t topk_at(const LLArgs& a, int64_t t, int k) {
  const uint8_t* p = a.idx + t * a.idx_st + int64_t(k) * a.idx_sk;
  return a.idx_i64 ? *reinterpret_cast<const int64_t*>(p) : int64_t(*reinterpret_cast<const int32_t*>(p));
}

__device__ __forceinline__ void record(const LLArgs& a, LLFailure kind, int peer, int64_t observed, int64_t expected) {
  FailureInfo f;
  f.kind = KernelFailure(int32_t(kind));
  f.peer = peer;
  f.observed = observed;
  f.expected = expected;
  report_failure(a.sync.report, f);
}

__device__ __forceinline__ bool call_failed(const LLArgs& a) {
  return ld_volatile(&a.sync.report->fail_flag) != 0 || ld_volatile(&a.sync.report->problem.flag) != 0;
}

// Sets this rank's flag in rank `to`'s array at `off` (from `to`'s base) to `value`: release,
// after a system fence, so whatever this thread and the kernels before it wrote comes first.
__device__ __forceinline__ void signal(const LLArgs& a, int to, uint64_t off, uint32_t value) {
  __threadfence_system();
  st_release_sys(word_at(a, to, off + 4ull * uint64_t(a.sync.rank)), value);
}

// Waits until every unmasked rank's flag in this rank's array at `off` has reached `epoch`. With
// masking, a rank still missing at the deadline is masked; without, the timeout is recorded with
// every missing rank (the lowest named) and the peers told. `waited` (optional) gets the ns each
// rank took (0 for masked ones). Block-wide; true if the call may go on.
__device__ bool wait_sources(const LLArgs& a, uint64_t off, uint32_t epoch, core::WaitRole role, int64_t* waited) {
  SY_SHARED(int, failed);  // 1: a peer aborted, 2: the deadline passed
  SY_SHARED(int, lowest);
  SY_SHARED(uint32_t[core::kMaxRanks / 32], missing);
  if (threadIdx.x == 0) {
    failed = 0;
    lowest = 0x7fffffff;
  }
  for (int i = threadIdx.x; i < core::kMaxRanks / 32; i += blockDim.x) missing[i] = 0;
  __syncthreads();
  const uint64_t start = global_ns();
  const uint32_t* flags = word_at(a, a.sync.rank, off);
  for (int r = threadIdx.x; r < a.sync.ranks; r += blockDim.x) {
    if (waited) waited[r] = 0;
    for (uint32_t spins = 0;; ++spins) {
      if (is_masked(a, r)) break;
      const uint32_t v = ld_acquire_sys(&flags[r]);
      if (epoch_reached(v, epoch)) {
        if (waited) waited[r] = int64_t(global_ns() - start);
        break;
      }
      bool late = false;
      if (const int why = ld_volatile(&failed)) {
        late = why == 2;  // another rank's deadline passed: this one is missing too
        if (!late) break;
      } else if ((spins & 63u) == 0) {
        if (check_aborted(a.sync)) {
          atomicMax(&failed, 1);
          break;
        }
        if (global_ns() - start > a.sync.timeout_ns) {
          if (a.masking) {  // masked from now on, in this rank's view
            st_release_sys(word_at(a, a.sync.rank, a.off_mask + 4ull * uint64_t(r)), 1u);
            break;
          }
          late = true;
          atomicMax(&failed, 2);
        }
      }
      if (late) {
        atomicOr(&missing[r / 32], 1u << (r % 32));
        atomicMin(&lowest, r);
        break;
      }
      if ((spins & 63u) == 0) __nanosleep(64);
    }
  }
  __syncthreads();
  const int why = ld_volatile(&failed);
  if (why == 2 && threadIdx.x == 0) {
    for (int i = 0; i < core::kMaxRanks / 32; ++i) a.sync.report->missing[i] = missing[i];
    FailureInfo f;
    f.kind = KernelFailure::Timeout;
    f.peer = lowest;
    f.role = role;
    f.expected = epoch;
    f.observed = ld_acquire_sys(&flags[lowest]);
    f.waited_ns = int64_t(global_ns() - start);
    report_failure(a.sync.report, f);
  }
  if (why == 2) abort_peers(a.sync, lowest, role, uint32_t(SY_ERROR_TIMEOUT));
  __syncthreads();
  return why == 0;
}

// After reading (or deciding not to read) this call's half: every unmasked source may reuse it.
__device__ void acknowledge(const LLArgs& a, uint32_t call) {
  for (int r = threadIdx.x; r < a.sync.ranks; r += blockDim.x)
    if (!is_masked(a, r)) signal(a, r, a.half + a.ll.off_consumed, call);
}

// Before writing into the peers' half: acknowledge a voided call's data (this rank gave it up),
// then wait until every unmasked destination has read the half's previous call. Block-wide.
__device__ bool wait_half_free(const LLArgs& a) {
  if (a.voided_call) acknowledge(a, a.voided_call);
  if (a.sync.epoch <= 2) return true;
  return wait_sources(a, a.half + a.ll.off_consumed, a.sync.epoch - 2, core::WaitRole::LLDispatch, nullptr);
}

// Tells every unmasked destination that this rank rejected its own input for this call.
__device__ void announce_rejection(const LLArgs& a, bool dispatch) {
  const int R = a.sync.ranks, me = a.sync.rank;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    if (is_masked(a, d)) continue;
    if (dispatch) {
      auto* counts = reinterpret_cast<int32_t*>(a.sync.bases[d] + a.half + a.ll.off_dispatch_count);
      for (int l = 0; l < a.ll.local_experts; ++l) counts[size_t(l) * R + me] = 0;
    }
    *word_at(a, d, a.half + (dispatch ? a.ll.off_dispatch_format : a.ll.off_combine_format) + 4ull * me) =
        core::kFormatRejected;
    signal(a, d, a.half + (dispatch ? a.ll.off_dispatch_flag : a.ll.off_combine_flag), a.sync.epoch);
  }
}

// A position-keyed hash of the top-k ids, independent of the order it is summed in: combine
// compares its own with its dispatch's (only the CUDA backend reads it).
__device__ __forceinline__ uint64_t topk_mix(uint64_t i, int64_t v) {
  uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t(v) + 0x632BE59BD9B4E019ull) * 0xBF58476D1CE4E5B9ull;
  z ^= z >> 31;
  z *= 0x94D049BB133111EBull;
  return z ^ (z >> 29);
}

// The block's sum of topk_mix over every entry, plus the shape. Block-wide; thread 0 has it.
__device__ uint64_t topk_fingerprint(const LLArgs& a) {
  SY_SHARED(unsigned long long, sum);
  if (threadIdx.x == 0) sum = 0;
  __syncthreads();
  unsigned long long mine = 0;
  const int64_t n = a.tokens * a.topk;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) mine += topk_mix(uint64_t(i), topk_at(a, i / a.topk, int(i % a.topk)));
  atomicAdd(&sum, mine);
  __syncthreads();
  return uint64_t(sum) + topk_mix(~0ull, a.tokens * 64 + a.topk);
}

// Notes every token whose top-k row is invalid; thread 0 then completes the report for the
// first one. Block-wide; true (on every thread) if all are valid.
__device__ bool check_topk(const LLArgs& a) {
  const int64_t E = a.ll.experts;
  for (int64_t t = threadIdx.x; t < a.tokens; t += blockDim.x) {
    int bad = 0;
    if (core::check_topk_row([&](int k) { return topk_at(a, t, k); }, a.topk, E, &bad) != core::TopkProblem::None) {
      note_problem(&a.sync.report->problem, t);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    finish_problem(&a.sync.report->problem, [&](int64_t t, int k) { return topk_at(a, t, k); }, a.topk, E);
  }
  __syncthreads();
  return ld_volatile(&a.sync.report->problem.flag) == 0;
}

// Copies n bytes with 16-byte accesses where both sides allow, threads `lane` of `lanes`.
__device__ __forceinline__ void copy_bytes(uint8_t* dst, const uint8_t* src, int64_t n, int lane, int lanes) {
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | uint64_t(n)) & 15u) == 0) {
    for (int64_t i = lane; i < n / 16; i += lanes) reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
  } else if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | uint64_t(n)) & 3u) == 0) {
    for (int64_t i = lane; i < n / 4; i += lanes) reinterpret_cast<uint32_t*>(dst)[i] = reinterpret_cast<const uint32_t*>(src)[i];
  } else {
    for (int64_t i = lane; i < n; i += lanes) dst[i] = src[i];
  }
}

__global__ void __launch_bounds__(kLLThreads) ll_send_prepare_kernel(LLArgs a, int dispatch) {
  if (threadIdx.x == 0) {
    a.s.state[0] = kSendOk;
    a.s.state[1] = 0;
    a.s.state[2] = 0;
    if (dispatch) a.handle->received = 0;
  }
  __syncthreads();
  if (!wait_half_free(a)) {
    if (threadIdx.x == 0) a.s.state[0] = kSendAborted;
    return;
  }
  SY_SHARED(int, reject);
  if (dispatch) {
    const bool valid = check_topk(a);  // block-wide: every thread gets the same answer
    if (threadIdx.x == 0) reject = valid ? 0 : 1;
  } else {
    if (threadIdx.x == 0) {
      // Its dispatch did not deliver (a peer died, say): the call is refused everywhere, and the
      // host reports that dispatch's failure.
      reject = ld_volatile(&a.handle->received) != 1;
      if (reject) {
        FailureInfo f;
        f.kind = KernelFailure::DispatchFailed;
        report_failure(a.sync.report, f);
      }
    }
    __syncthreads();
    // The rows it sends back are addressed by the handle's layout: every range and source token
    // in bounds, or the call is refused (the handle tensors are read-only; this is the check
    // that a corrupt one cannot make this rank write outside a peer's buffer).
    if (!reject) {
      const int R = a.sync.ranks, EL = a.ll.local_experts;
      const int64_t N = a.ll.recv_rows();
      for (int p = threadIdx.x; p < EL * R; p += blockDim.x) {
        const int l = p / R;
        const int64_t rs = a.layout_range[p], begin = rs >> 32, c = rs & 0xffffffff;
        bool bad = begin < 0 || c > a.ll.max_tokens || begin + c > N;
        for (int64_t i = 0; i < c && !bad; ++i) {
          const int32_t t = a.src_info[uint64_t(l) * uint64_t(N) + uint64_t(begin + i)];
          bad = t < 0 || t >= a.ll.max_tokens;
        }
        if (bad) {
          record(a, LLFailure::CorruptHandle, -1, p, 0);
          atomicMax(&reject, 1);
        }
      }
    }
  }
  __syncthreads();
  if (reject) {
    announce_rejection(a, dispatch != 0);
    if (threadIdx.x == 0) a.s.state[0] = kSendRejected;
    return;
  }
  if (!dispatch) return;
  // Each entry's slot in its expert's range from this rank: entries in token order (an expert
  // appears once per token), none for masked destinations.
  const int K = a.topk, EL = a.ll.local_experts, E = a.ll.experts;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const bool skip = is_masked(a, e / EL);
    int32_t count = 0;
    for (int64_t t = 0; t < a.tokens; ++t)
      for (int k = 0; k < K; ++k)
        if (topk_at(a, t, k) == e) a.s.slots[t * K + k] = skip ? -1 : count++;
    a.s.counts[e] = count;
  }
  for (int64_t i = threadIdx.x; i < a.tokens * K; i += blockDim.x)
    if (topk_at(a, i / K, int(i % K)) < 0) a.s.slots[i] = -1;
  const uint64_t fp = topk_fingerprint(a);
  if (threadIdx.x == 0) a.handle->fingerprint = fp;
}

// One block per token: quantised once into shared memory (FP8), then written into the message
// slot of every destination expert.
__global__ void __launch_bounds__(kLLThreads) ll_dispatch_send_kernel(LLArgs a) {
  if (ld_volatile(&a.s.state[0]) != kSendOk) return;
  SY_DYNAMIC_SHARED(uint8_t, smem);
  const int H = a.ll.hidden, K = a.topk, EL = a.ll.local_experts, me = a.sync.rank;
  const int blocks = H / core::kScaleBlock;
  const int words = a.fp8 ? core::ll_scale_words(H, a.ue8m0 != 0) : 0;
  const int payload = a.fp8 ? H : 2 * H;
  uint8_t* q = smem;
  auto* scales = reinterpret_cast<uint32_t*>(smem + core::align_up(uint64_t(H), 16));
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, warps = int(blockDim.x) / 32;
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    const uint8_t* row = a.x + t * a.x_stride;
    const uint8_t* body = row;
    if (a.fp8) {
      for (int j = threadIdx.x; j < words; j += blockDim.x) scales[j] = 0;
      __syncthreads();
      // A warp per block of 128 channels, 4 channels a lane: amax (NaN ignored, as fmaxf does),
      // the block's scale, the codes (core/quant.h).
      for (int b = warp; b < blocks; b += warps) {
        const uint16_t* blk = reinterpret_cast<const uint16_t*>(row) + b * core::kScaleBlock + lane * 4;
        uint16_t v[4];
        float m = 0.0f;
        for (int i = 0; i < 4; ++i) {
          v[i] = blk[i];
          m = fmaxf(m, fabsf(core::bf16_to_float(v[i])));
        }
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        const core::BlockScale bs = core::fp8_block_scale(m, a.round_scale != 0);
        uint32_t codes = 0;
        for (int i = 0; i < 4; ++i) codes |= uint32_t(core::fp8_quantize(v[i], bs.scale)) << (8 * i);
        *reinterpret_cast<uint32_t*>(q + b * core::kScaleBlock + lane * 4) = codes;
        if (lane == 0) {
          if (a.ue8m0) {
            atomicOr(&scales[b / 4], uint32_t(core::ue8m0_of(bs.scale_inv)) << (8 * (b % 4)));
          } else {
            scales[b] = core::float_bits(bs.scale_inv);
          }
        }
      }
      __syncthreads();
      body = q;
    }
    for (int k = 0; k < K; ++k) {
      const int64_t e = topk_at(a, t, k);
      if (e < 0) continue;
      const int32_t slot = a.s.slots[t * K + k];
      if (slot < 0) continue;  // a masked destination
      const int d = int(e / EL), l = int(e % EL);
      uint8_t* msg = a.sync.bases[d] + a.half + a.ll.msg(l, me, slot);
      if (threadIdx.x == 0) *reinterpret_cast<int4*>(msg) = make_int4(int(t), 0, 0, 0);
      copy_bytes(msg + a.ll.msg_payload, body, payload, int(threadIdx.x), int(blockDim.x));
      for (int j = threadIdx.x; j < words; j += blockDim.x) reinterpret_cast<uint32_t*>(msg + a.ll.msg_scales)[j] = scales[j];
    }
    __syncthreads();  // the next token's codes go where these were read from
  }
  __threadfence_system();  // this block's writes, before the finish kernel's flags (another thread's)
}

// A warp per received row: back to its source, keyed by [global expert][token], as BF16 or as
// LogFMT-10 blocks (a warp per block of 128 channels, 4 codes = 5 bytes a lane).
__global__ void __launch_bounds__(kLLThreads) ll_combine_send_kernel(LLArgs a) {
  if (ld_volatile(&a.s.state[0]) != kSendOk) return;
  const int R = a.sync.ranks, EL = a.ll.local_experts, H = a.ll.hidden, me = a.sync.rank;
  const int64_t N = a.ll.recv_rows();
  const uint8_t* own = a.sync.bases[me] + a.half;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, warps = int(blockDim.x) / 32;
  for (int p = blockIdx.x; p < EL * R; p += gridDim.x) {
    const int l = p / R, s = p % R;
    if (is_masked(a, s)) continue;
    const int64_t rs = a.layout_range[size_t(l) * R + s], begin = rs >> 32, c = rs & 0xffffffff;
    const int64_t e = int64_t(me) * EL + l;
    for (int64_t i = warp; i < c; i += warps) {
      const int64_t row = begin + i;
      const uint8_t* y = a.zero_copy ? own + a.ll.send_row(l, row) : a.y + (uint64_t(l) * N + uint64_t(row)) * uint64_t(H) * 2;
      const int32_t token = a.src_info[uint64_t(l) * N + uint64_t(row)];
      uint8_t* dst = a.sync.bases[s] + a.half + a.ll.combine_row(e, token);
      if (!a.logfmt) {
        copy_bytes(dst, y, int64_t(H) * 2, lane, 32);
        continue;
      }
      auto* meta = reinterpret_cast<uint16_t*>(dst + a.ll.row_meta);
      for (int b = 0; b < H / core::kScaleBlock; ++b) {
        const uint16_t* blk = reinterpret_cast<const uint16_t*>(y) + b * core::kScaleBlock + lane * 4;
        uint16_t v[4];
        uint32_t m_max = 0, m_min = 0xffff;
        for (int j = 0; j < 4; ++j) {
          v[j] = blk[j];
          const uint32_t m = v[j] & 0x7fffu;
          m_max = m > m_max ? m : m_max;
          if (m != 0 && m < m_min) m_min = m;
        }
        for (int o = 16; o > 0; o >>= 1) {
          const uint32_t hi = __shfl_xor_sync(0xffffffffu, m_max, o), lo = __shfl_xor_sync(0xffffffffu, m_min, o);
          m_max = hi > m_max ? hi : m_max;
          m_min = lo < m_min ? lo : m_min;
        }
        const core::LogfmtMeta mt = core::logfmt_plan_from(uint16_t(m_max), uint16_t(m_min));
        uint8_t* out = dst + b * core::kScaleBlock * 2;
        if (mt.step == 0) {  // the block travels as BF16
          for (int j = 0; j < 4; ++j) reinterpret_cast<uint16_t*>(out)[lane * 4 + j] = v[j];
        } else {
          const uint64_t packed = core::logfmt_pack4(core::logfmt_code(v[0], mt), core::logfmt_code(v[1], mt),
                                                     core::logfmt_code(v[2], mt), core::logfmt_code(v[3], mt));
          for (int j = 0; j < 5; ++j) out[lane * 5 + j] = uint8_t(packed >> (8 * j));
        }
        if (lane == 0) {
          meta[2 * b] = mt.m_min;
          meta[2 * b + 1] = mt.step;
        }
      }
    }
  }
  __threadfence_system();  // this block's writes, before the finish kernel's flags (another thread's)
}

// Per unmasked destination: the counts (dispatch), the format word, then the flag.
__global__ void __launch_bounds__(kLLThreads) ll_send_finish_kernel(LLArgs a, int dispatch) {
  if (ld_volatile(&a.s.state[0]) != kSendOk) return;
  const int R = a.sync.ranks, EL = a.ll.local_experts, me = a.sync.rank;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    if (is_masked(a, d)) continue;
    if (dispatch) {
      auto* counts = reinterpret_cast<int32_t*>(a.sync.bases[d] + a.half + a.ll.off_dispatch_count);
      for (int l = 0; l < EL; ++l) counts[size_t(l) * R + me] = a.s.counts[size_t(d) * EL + l];
    }
    *word_at(a, d, a.half + (dispatch ? a.ll.off_dispatch_format : a.ll.off_combine_format) + 4ull * me) = a.format;
    signal(a, d, a.half + (dispatch ? a.ll.off_dispatch_flag : a.ll.off_combine_flag), a.sync.epoch);
  }
}

__global__ void __launch_bounds__(kLLThreads) ll_recv_prepare_kernel(LLArgs a, int dispatch) {
  if (ld_volatile(&a.s.state[0]) == kSendAborted) return;  // the peers were told; nothing arrives
  const int R = a.sync.ranks;
  const uint64_t off_flag = a.half + (dispatch ? a.ll.off_dispatch_flag : a.ll.off_combine_flag);
  if (!wait_sources(a, off_flag, a.sync.epoch, dispatch ? core::WaitRole::LLDispatch : core::WaitRole::LLCombine,
                    a.s.waited)) {
    if (threadIdx.x == 0) a.s.state[2] = 1;  // not acknowledged: the call is over everywhere
    return;
  }
  // From here the half is acknowledged whatever is found. One thread checks the sources in
  // order, so the lowest offending rank is the one named, as on the host backend.
  // Thread 0 decides (the report lives in host memory: read once, not per source).
  SY_SHARED(int, ok);
  if (threadIdx.x == 0) {
    bool fine = !call_failed(a);
    const uint32_t* formats =
        word_at(a, a.sync.rank, a.half + (dispatch ? a.ll.off_dispatch_format : a.ll.off_combine_format));
    if (fine && ld_volatile(&a.s.state[0]) == kSendRejected) {
      record(a, LLFailure::SelfRejected, a.sync.rank, 0, 0);
      fine = false;
    }
    for (int s = 0; s < R && fine; ++s) {
      if (is_masked(a, s)) continue;
      const uint32_t f = ld_acquire_sys(&formats[s]);
      if (f & core::kFormatRejected) {
        FailureInfo fi;
        fi.kind = KernelFailure::PeerRejected;
        fi.peer = s;
        report_failure(a.sync.report, fi);
        fine = false;
      } else if (f != a.format) {
        record(a, LLFailure::Format, s, f, a.format);
        fine = false;
      }
    }
    if (dispatch) {
      // Per local expert: the sources' counts (each read once, then used), the ranges, the total.
      const auto* counts = reinterpret_cast<const int32_t*>(a.sync.bases[a.sync.rank] + a.half + a.ll.off_dispatch_count);
      for (int l = 0; l < a.ll.local_experts && fine; ++l) {
        int64_t begin = 0;
        for (int s = 0; s < R && fine; ++s) {
          const int32_t c = is_masked(a, s) ? 0 : ld_volatile(&counts[size_t(l) * R + s]);
          if (c < 0 || c > a.ll.max_tokens) {
            record(a, LLFailure::Count, s, c, a.ll.max_tokens);
            fine = false;
          }
          a.layout_range[size_t(l) * R + s] = (begin << 32) | int64_t(uint32_t(c));
          begin += c;
        }
        a.recv_count[l] = int32_t(begin);
      }
    }
    ok = fine ? 1 : 0;
  }
  __syncthreads();
  if (!dispatch && ok) {
    // The routing must be valid, and the one the dispatch used (rows are keyed by it).
    if (!check_topk(a)) {
      if (threadIdx.x == 0) ok = 0;
    } else {
      const uint64_t fp = topk_fingerprint(a);
      if (threadIdx.x == 0 && fp != a.handle->fingerprint) {
        record(a, LLFailure::RoutingMismatch, -1, 0, 0);
        ok = 0;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) a.s.state[1] = ok;
}

// A warp per message: payload, source token index and scales (token dimension contiguous).
__global__ void __launch_bounds__(kLLThreads) ll_dispatch_recv_kernel(LLArgs a) {
  if (ld_volatile(&a.s.state[1]) != 1) return;
  const int R = a.sync.ranks, EL = a.ll.local_experts, H = a.ll.hidden;
  const int64_t N = a.ll.recv_rows();
  const int payload = a.fp8 ? H : 2 * H;
  const int words = a.fp8 ? core::ll_scale_words(H, a.ue8m0 != 0) : 0;
  const uint8_t* own = a.sync.bases[a.sync.rank] + a.half;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, warps = int(blockDim.x) / 32;
  for (int p = blockIdx.x; p < EL * R; p += gridDim.x) {
    const int l = p / R, s = p % R;
    const int64_t rs = a.layout_range[size_t(l) * R + s], begin = rs >> 32, c = rs & 0xffffffff;
    for (int64_t i = warp; i < c; i += warps) {
      const uint8_t* msg = own + a.ll.msg(l, s, i);
      const uint64_t row = uint64_t(l) * uint64_t(N) + uint64_t(begin + i);
      copy_bytes(a.recv_x + row * uint64_t(payload), msg + a.ll.msg_payload, payload, lane, 32);
      if (lane == 0) a.src_info[row] = *reinterpret_cast<const int32_t*>(msg);
      for (int j = lane; j < words; j += 32) {
        a.recv_scales[uint64_t(l) * uint64_t(N) * uint64_t(words) + uint64_t(begin + i) + uint64_t(j) * uint64_t(N)] =
            reinterpret_cast<const uint32_t*>(msg + a.ll.msg_scales)[j];
      }
    }
  }
}

// A block per token, a thread per channel: the weighted sum of the token's rows in top-k order,
// every product and sum rounded on its own (core/fparith.h), one rounding to BF16.
__global__ void __launch_bounds__(kLLThreads) ll_combine_recv_kernel(LLArgs a) {
  if (ld_volatile(&a.s.state[1]) != 1) return;
  const int H = a.ll.hidden, K = a.topk, EL = a.ll.local_experts;
  const uint8_t* own = a.sync.bases[a.sync.rank] + a.half;
  // The mask, read once: it does not change while the call receives (the prepare kernel made
  // its last changes).
  SY_SHARED(uint8_t[core::kMaxRanks], masked);
  for (int r = threadIdx.x; r < a.sync.ranks; r += blockDim.x) masked[r] = is_masked(a, r) ? 1 : 0;
  __syncthreads();
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
      float acc = 0.0f;
      for (int k = 0; k < K; ++k) {
        const int64_t e = topk_at(a, t, k);
        if (e < 0 || masked[e / EL]) continue;
        const float w = *reinterpret_cast<const float*>(a.weights + t * a.w_st + int64_t(k) * a.w_sk);
        const uint8_t* src = own + a.ll.combine_row(e, t);
        uint16_t v = reinterpret_cast<const uint16_t*>(src)[c];
        if (a.logfmt) {
          const int b = c / core::kScaleBlock;
          const auto* meta = reinterpret_cast<const uint16_t*>(src + a.ll.row_meta) + 2 * b;
          const core::LogfmtMeta m{meta[0], meta[1]};
          if (m.step != 0) {
            v = core::logfmt_decode(core::logfmt_get(src + b * core::kScaleBlock * 2, c % core::kScaleBlock), m);
          }
        }
        acc = core::add_rn(acc, core::mul_rn(w, core::bf16_to_float(v)));
      }
      reinterpret_cast<uint16_t*>(a.out + t * a.out_stride)[c] = core::float_to_bf16(acc);
    }
  }
}

// Whether any source overwrote the half while it was read; the acknowledgement; the statistics
// of a call that delivered.
__global__ void __launch_bounds__(kLLThreads) ll_recv_finish_kernel(LLArgs a, int dispatch) {
  if (ld_volatile(&a.s.state[0]) == kSendAborted || ld_volatile(&a.s.state[2]) != 0) return;
  const int R = a.sync.ranks;
  SY_SHARED(int, delivered);
  if (threadIdx.x == 0) {
    delivered = ld_volatile(&a.s.state[1]);
    const uint32_t* flags =
        word_at(a, a.sync.rank, a.half + (dispatch ? a.ll.off_dispatch_flag : a.ll.off_combine_flag));
    for (int r = 0; r < R && delivered; ++r) {
      if (is_masked(a, r)) continue;
      if (const uint32_t f = ld_acquire_sys(&flags[r]); f != a.sync.epoch) {
        record(a, LLFailure::Overwritten, r, f, a.sync.epoch);
        delivered = 0;
      }
    }
  }
  __syncthreads();
  acknowledge(a, a.sync.epoch);  // read or not, the half is free for the senders again
  if (!delivered) return;
  if (dispatch) {
    if (a.expert_stats)
      for (int l = threadIdx.x; l < a.ll.local_experts; l += blockDim.x) a.expert_stats[l] += a.recv_count[l];
    if (threadIdx.x == 0) a.handle->received = 1;
  }
  if (a.wait_stats)
    for (int s = threadIdx.x; s < R; s += blockDim.x) a.wait_stats[s] += a.s.waited[s];
}

__global__ void __launch_bounds__(kLLThreads) ll_reject_kernel(LLArgs a, int dispatch) {
  if (!wait_half_free(a)) return;
  announce_rejection(a, dispatch != 0);
  const uint64_t off_flag = a.half + (dispatch ? a.ll.off_dispatch_flag : a.ll.off_combine_flag);
  if (!wait_sources(a, off_flag, a.sync.epoch, dispatch ? core::WaitRole::LLDispatch : core::WaitRole::LLCombine,
                    nullptr)) {
    return;
  }
  acknowledge(a, a.sync.epoch);
}

// The reset's barrier: the full one (kind and parameters compared), or with masking the masked
// ranks left out and those missing at the deadline masked (host: Peers::masked_barrier).
__global__ void __launch_bounds__(kLLThreads) ll_clean_barrier_kernel(LLArgs a) {
  if (call_failed(a)) return;  // the first barrier failed: this rank's part is over
  uint32_t desc[core::kDescWords] = {uint32_t(core::OpKind::CleanLowLatency)};
  if (!a.masking) {
    (void)barrier(a.sync, desc);
    return;
  }
  const int R = a.sync.ranks;
  SY_SHARED(int, aborted);  // one answer for the whole block: a peer may abort while we look
  if (threadIdx.x == 0) aborted = check_aborted(a.sync) ? 1 : 0;
  __syncthreads();
  if (aborted) return;
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if (is_masked(a, r)) continue;
    *word_at(a, r, core::op_slot(a.sync.off_op_kind, R, a.sync.rank, a.sync.epoch, 1)) = desc[0];
    uint32_t* slot = word_at(a, r, core::op_slot(a.sync.off_op_desc, R, a.sync.rank, a.sync.epoch, core::kDescSlotWords));
    for (int i = 0; i < core::kDescWords; ++i) slot[i] = 0u;
    slot[core::kDescEpoch] = a.sync.epoch;
    signal(a, r, a.sync.off_barrier, a.sync.epoch);
  }
  (void)wait_sources(a, a.sync.off_barrier, a.sync.epoch, core::WaitRole::Barrier, nullptr);
}

// Between the reset's barriers: this rank's signals of both halves, zeroed.
__global__ void __launch_bounds__(kLLThreads) ll_clean_signals_kernel(LLArgs a) {
  if (call_failed(a)) return;
  for (int h = 0; h < 2; ++h) {
    auto* w = word_at(a, a.sync.rank, a.ll.half(h));
    for (uint64_t i = threadIdx.x; i < a.ll.signal_bytes / 4; i += blockDim.x) w[i] = 0u;
  }
}

}  // namespace

cudaError_t launch_ll_send(const LLArgs& a, bool dispatch, int blocks, cudaStream_t stream) {
  SY_LAUNCH(ll_send_prepare_kernel, 1, kLLThreads, 0, stream)(a, int(dispatch));
  if (dispatch) {
    const int words = a.fp8 ? core::ll_scale_words(a.ll.hidden, a.ue8m0 != 0) : 0;
    const size_t shared = size_t(core::align_up(uint64_t(a.ll.hidden), 16)) + 4 * size_t(words);
#if !SY_CUDA_ON_CPU
    if (shared > 48 * 1024) {
      const cudaError_t rc =
          cudaFuncSetAttribute(ll_dispatch_send_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
      if (rc != cudaSuccess) return rc;
    }
#endif
    SY_LAUNCH(ll_dispatch_send_kernel, blocks, kLLThreads, shared, stream)(a);
  } else {
    SY_LAUNCH(ll_combine_send_kernel, blocks, kLLThreads, 0, stream)(a);
  }
  SY_LAUNCH(ll_send_finish_kernel, 1, kLLThreads, 0, stream)(a, int(dispatch));
  return cudaGetLastError();
}

cudaError_t launch_ll_receive(const LLArgs& a, bool dispatch, int blocks, cudaStream_t stream) {
  SY_LAUNCH(ll_recv_prepare_kernel, 1, kLLThreads, 0, stream)(a, int(dispatch));
  if (dispatch) {
    SY_LAUNCH(ll_dispatch_recv_kernel, blocks, kLLThreads, 0, stream)(a);
  } else {
    SY_LAUNCH(ll_combine_recv_kernel, blocks, kLLThreads, 0, stream)(a);
  }
  SY_LAUNCH(ll_recv_finish_kernel, 1, kLLThreads, 0, stream)(a, int(dispatch));
  return cudaGetLastError();
}

cudaError_t launch_ll_reject(const LLArgs& a, bool dispatch, cudaStream_t stream) {
  SY_LAUNCH(ll_reject_kernel, 1, kLLThreads, 0, stream)(a, int(dispatch));
  return cudaGetLastError();
}

cudaError_t launch_ll_clean(const LLArgs& a, cudaStream_t stream) {
  SY_LAUNCH(ll_clean_barrier_kernel, 1, kLLThreads, 0, stream)(a);
  SY_LAUNCH(ll_clean_signals_kernel, 1, kLLThreads, 0, stream)(a);
  LLArgs second = a;
  second.sync.epoch = a.sync.epoch + 1;
  SY_LAUNCH(ll_clean_barrier_kernel, 1, kLLThreads, 0, stream)(second);
  return cudaGetLastError();
}

}  // namespace sy::cuda
