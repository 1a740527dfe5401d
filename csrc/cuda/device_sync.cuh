// Device side of the peer protocol: flags in the peers' buffer headers (core::BufferPlan),
// written with release stores and read with acquire loads at system scope, so a flag never
// overtakes the data it announces, across GPUs as well as between virtual ranks of one GPU.
//
// Every wait has a deadline (the GPU's global timer). On expiry the waiter records whom it
// waited for in its KernelReport, tells every peer through their abort records, and returns:
// kernels never trap, so the CUDA context survives a dead peer.
#pragma once

#include <cstdint>

#include "../core/failure.h"
#include "../core/op_desc.h"
#include "../core/plan.h"
#include "../core/routing.h"
#include "kernel_report.h"
#include "portable.cuh"
#include "switchyard.h"

namespace sy::cuda {

// Epochs wrap around: "v has reached e" is a signed comparison of the difference.
__device__ __forceinline__ bool epoch_reached(uint32_t v, uint32_t e) { return int32_t(v - e) >= 0; }

// Whether an earlier kernel of this operation already failed (then later ones do nothing).
__device__ __forceinline__ bool op_failed(const KernelReport* r) {
  return ld_volatile(&r->fail_flag) != 0 || ld_volatile(&r->problem.flag) != 0 ||
         ld_volatile(reinterpret_cast<const unsigned long long*>(&r->problem.lowest)) != 0;
}

// Records the operation's failure; the first one wins. Any thread may call it.
struct FailureInfo {
  KernelFailure kind = KernelFailure::None;
  int32_t peer = -1;
  core::WaitRole role = core::WaitRole::None;
  int64_t expected = 0, observed = 0, waited_ns = 0;
  int32_t a = 0, b = 0, c = 0;
};

__device__ inline void report_failure(KernelReport* r, const FailureInfo& f) {
  if (atomicCAS_system(&r->fail_flag, 0, -1) != 0) return;
  r->fail_kind = int32_t(f.kind);
  r->peer = f.peer;
  r->role = int32_t(f.role);
  r->expected = f.expected;
  r->observed = f.observed;
  r->waited_ns = f.waited_ns;
  r->a = f.a;
  r->b = f.b;
  r->c = f.c;
  st_release_sys(reinterpret_cast<uint32_t*>(&r->fail_flag), 1u);
}

// Bad input: a thread notes the token; finish_problem (one thread, later) fills in the rest.
__device__ __forceinline__ void note_problem(core::InputProblem* p, int64_t token) {
  atomicMax(reinterpret_cast<unsigned long long*>(&p->lowest), ~static_cast<unsigned long long>(token));
}

// Re-examines the lowest bad token noted and completes the record (one thread; `at(t, k)` reads
// entry k of token t).
template <class At>
__device__ void finish_problem(core::InputProblem* p, At at, int topk, int64_t experts) {
  const unsigned long long lowest = ld_volatile(reinterpret_cast<const unsigned long long*>(&p->lowest));
  if (lowest == 0 || ld_volatile(&p->flag) != 0) return;
  const int64_t t = int64_t(~lowest);
  int bad = 0;
  const core::TopkProblem kind = core::check_topk_row([&](int k) { return at(t, k); }, topk, experts, &bad);
  p->kind = int32_t(kind);
  p->token = t;
  p->entry = bad;
  p->experts = int32_t(experts);
  p->value = at(t, bad);
  st_release_sys(reinterpret_cast<uint32_t*>(&p->flag), 1u);
}

// The header words one rank's operation uses, and whom it talks to.
struct SyncArgs {
  int rank = 0, ranks = 0;
  uint32_t epoch = 0;
  uint64_t timeout_ns = 0;
  uint8_t* const* bases = nullptr;  // device array: every rank's buffer base
  uint64_t off_abort = 0, off_op_kind = 0, off_op_desc = 0, off_barrier = 0;
  KernelReport* report = nullptr;
};

__device__ __forceinline__ uint32_t* header_word(const SyncArgs& a, int owner, uint64_t off) {
  return reinterpret_cast<uint32_t*>(a.bases[owner] + off);
}

// My abort record, if a peer wrote one: recorded as PeerAborted. Returns true if so.
__device__ inline bool check_aborted(const SyncArgs& a) {
  uint32_t* rec = header_word(a, a.rank, a.off_abort);
  if (ld_acquire_sys(&rec[core::kAbortFlag]) != 1u) return false;
  FailureInfo f;
  f.kind = KernelFailure::PeerAborted;
  f.peer = int32_t(rec[core::kAbortRank]);
  f.a = rec[core::kAbortPeer] == 0xffffffffu ? -1 : int32_t(rec[core::kAbortPeer]);
  f.b = int32_t(rec[core::kAbortRole]);
  f.c = int32_t(rec[core::kAbortStatus]);
  f.expected = rec[core::kAbortEpoch];
  report_failure(a.report, f);
  return true;
}

// Tells every peer that this rank gave up on the operation (their waits end at once). The
// first reason stays in each record. Block-wide: threads split the peers.
__device__ inline void abort_peers(const SyncArgs& a, int32_t waited_for, core::WaitRole role, uint32_t status) {
  for (int r = threadIdx.x; r < a.ranks; r += blockDim.x) {
    uint32_t* rec = header_word(a, r, a.off_abort);
    if (atomicCAS_system(&rec[core::kAbortFlag], 0u, 2u) != 0u) continue;
    rec[core::kAbortRank] = uint32_t(a.rank);
    rec[core::kAbortPeer] = waited_for >= 0 ? uint32_t(waited_for) : 0xffffffffu;
    rec[core::kAbortRole] = uint32_t(role);
    rec[core::kAbortEpoch] = a.epoch;
    rec[core::kAbortStatus] = status;
    st_release_sys(&rec[core::kAbortFlag], 1u);
  }
}

// Sets my flag in every peer's array at `off` to this epoch (release: what I wrote before is
// visible to whoever sees the flag). Block-wide.
__device__ inline void signal_peers(const SyncArgs& a, uint64_t off) {
  __syncthreads();  // every thread's earlier writes come before any flag
  for (int r = threadIdx.x; r < a.ranks; r += blockDim.x) {
    __threadfence_system();
    st_release_sys(header_word(a, r, off + 4ull * uint64_t(a.rank)), a.epoch);
  }
}

// A hop every rank announces when it starts it (two hops across nodes: network_state.cuh), so
// that a wait that runs out names a rank that never started it, the one everybody waits for,
// rather than a peer that only waits for that one itself. off_started 0: none.
struct LateHop {
  uint64_t off_started = 0;
  core::WaitRole role = core::WaitRole::None;
  int32_t ranks_per_node = 1;
};

// The first peer (of ranks first, first + step, ...) that has not announced the hop of this
// epoch at `off_started`; -1: none.
__device__ inline int first_not_started(const SyncArgs& a, uint64_t off_started, uint32_t* seen, int first = 0,
                                        int step = 1) {
  for (int p = first; p < a.ranks; p += step) {
    if (p == a.rank) continue;
    const uint32_t v = ld_acquire_sys(header_word(a, a.rank, off_started + 4ull * uint64_t(p)));
    if (epoch_reached(v, a.epoch)) continue;
    *seen = v;
    return p;
  }
  return -1;
}

// The rank that never started the hop, if any: this rank's column first (its network peers, the
// ranks with its index on the other nodes), then any.
__device__ inline int late_peer(const SyncArgs& a, const LateHop& late, uint32_t* seen) {
  if (late.off_started == 0) return -1;
  const int P = late.ranks_per_node > 0 ? late.ranks_per_node : 1;
  const int p = first_not_started(a, late.off_started, seen, a.rank % P, P);
  return p >= 0 ? p : first_not_started(a, late.off_started, seen);
}

// Waits until every peer's flag in my array at `off` has reached this epoch. Block-wide; every
// thread returns the same answer. On a timeout the failure is recorded and the peers told.
__device__ inline bool wait_peers(const SyncArgs& a, uint64_t off, core::WaitRole role, LateHop late = {}) {
  SY_SHARED(int, failed);
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  const uint64_t start = global_ns();
  const uint32_t* flags = header_word(a, a.rank, off);
  for (int r = threadIdx.x; r < a.ranks; r += blockDim.x) {
    for (uint32_t spins = 0;; ++spins) {
      const uint32_t v = ld_acquire_sys(&flags[r]);
      if (epoch_reached(v, a.epoch)) break;
      if (ld_volatile(&failed)) break;
      if ((spins & 63u) == 0) {
        if (check_aborted(a)) {
          atomicMax(&failed, 1);
          break;
        }
        const uint64_t waited = global_ns() - start;
        if (waited > a.timeout_ns) {
          FailureInfo f;
          f.kind = KernelFailure::Timeout;
          f.peer = r;
          f.role = role;
          f.expected = a.epoch;
          f.observed = v;
          f.waited_ns = int64_t(waited);
          uint32_t seen = 0;
          if (const int p = late_peer(a, late, &seen); p >= 0) {
            f.peer = p;
            f.role = late.role;
            f.observed = seen;
          }
          report_failure(a.report, f);
          atomicMax(&failed, 2);  // a timeout of ours outranks a peer's abort: the peers must hear of it
          break;
        }
        __nanosleep(64);
      }
    }
  }
  __syncthreads();
  const int why = ld_volatile(&failed);
  if (why == 2) {
    // Name the peer the report names (the first timeout recorded), in the hop it never started
    // if it did not.
    const int peer = ld_volatile(&a.report->peer);
    const bool late_one =
        late.off_started != 0 && peer >= 0 && peer < a.ranks &&
        !epoch_reached(ld_acquire_sys(header_word(a, a.rank, late.off_started + 4ull * uint64_t(peer))), a.epoch);
    abort_peers(a, peer, late_one ? late.role : role, uint32_t(SY_ERROR_TIMEOUT));
  }
  __syncthreads();
  return why == 0;
}

// The start-of-operation barrier: publish my kind and parameters into every peer's header,
// arrive, wait for everyone, then check that all called the same thing with the same
// parameters. Block-wide; false (with the report filled) if the operation cannot go on.
__device__ inline bool barrier(const SyncArgs& a, const uint32_t* desc) {
  SY_SHARED(int, verdict);  // one answer for the whole block: a peer may abort while we look
  if (threadIdx.x == 0) verdict = check_aborted(a) ? 0 : 1;
  __syncthreads();
  if (verdict == 0) return false;
  // Slots by epoch parity, stamped (core::op_slot): a fast peer's next operation never
  // overwrites this one while a slower rank still compares it.
  for (int r = threadIdx.x; r < a.ranks; r += blockDim.x) {
    *header_word(a, r, core::op_slot(a.off_op_kind, a.ranks, a.rank, a.epoch, 1)) = desc[0];
    uint32_t* slot = header_word(a, r, core::op_slot(a.off_op_desc, a.ranks, a.rank, a.epoch, core::kDescSlotWords));
    for (int i = 0; i < core::kDescWords; ++i) slot[i] = desc[i];
    slot[core::kDescEpoch] = a.epoch;
  }
  signal_peers(a, a.off_barrier);
  if (!wait_peers(a, a.off_barrier, core::WaitRole::Barrier)) return false;
  for (int r = threadIdx.x; r < a.ranks; r += blockDim.x) {
    const uint32_t* theirs =
        header_word(a, a.rank, core::op_slot(a.off_op_desc, a.ranks, r, a.epoch, core::kDescSlotWords));
    const uint32_t kind = *header_word(a, a.rank, core::op_slot(a.off_op_kind, a.ranks, r, a.epoch, 1));
    const core::SlotCheck c = core::check_barrier_slot(desc, kind, theirs, a.epoch, r == a.rank);
    if (c.verdict == core::SlotVerdict::Agree) continue;
    FailureInfo f;
    f.peer = r;
    f.expected = c.mine;
    f.observed = c.theirs;
    f.a = c.word;
    f.kind = c.verdict == core::SlotVerdict::MovedOn     ? KernelFailure::PeerMovedOn
             : c.verdict == core::SlotVerdict::OtherKind ? KernelFailure::KindMismatch
             : c.verdict == core::SlotVerdict::Rejected  ? KernelFailure::PeerRejected
                                                         : KernelFailure::DescMismatch;
    report_failure(a.report, f);
  }
  __syncthreads();
  if (threadIdx.x == 0) verdict = ld_volatile(&a.report->fail_flag) == 0 && desc[core::kDescRejected] == 0;
  __syncthreads();
  return verdict != 0;
}

}  // namespace sy::cuda
