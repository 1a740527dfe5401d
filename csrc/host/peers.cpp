#include "peers.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "../abi/protocol_errors.h"
#include "../core/op_desc.h"
#include "futex.h"

namespace sy::host {

Peers::Peers(BufferSet& set, int rank, int64_t timeout_ms, uint32_t epoch)
    : set_(set), rank_(rank), timeout_ms_(timeout_ms), epoch_(epoch) {}

Error Peers::wait_joined(const uint32_t* mask) {
  std::unique_lock<std::mutex> l(set_.mu);
  Deadline d = deadline();
  double start = now_seconds();
  const int R = num_ranks();
  auto missing_any = [&] {
    for (int r = 0; r < R; ++r)
      if (set_.bases[r] == nullptr && !(mask && load_acquire(&mask[r]) != 0)) return true;
    return false;
  };
  while (missing_any()) {
    double left = d.remaining_seconds();
    if (left <= 0) {
      std::string missing;
      int first = -1;
      for (int r = 0; r < R; ++r) {
        if (set_.bases[r] != nullptr || (mask && load_acquire(&mask[r]) != 0)) continue;
        if (first < 0) first = r;
        missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      }
      core::WaitFailure w;
      w.rank = rank_;
      w.peer = first;
      w.role = core::WaitRole::BufferPeers;
      w.expected = R;
      w.observed = set_.joined;
      w.waited_seconds = now_seconds() - start;
      return timeout_error(w, "ranks without a matching buffer: " + missing);
    }
    set_.cv.wait_for(l, std::chrono::duration<double>(left));
  }
  return ok();
}

void Peers::ring(int owner) {
  uint32_t* bell = word(owner, plan().off_doorbell);
  __atomic_fetch_add(bell, 1u, __ATOMIC_RELEASE);
  futex_wake_all(bell);
}

void Peers::signal(int to, uint64_t off_array) {
  store_release(word(to, off_array + 4ull * uint64_t(rank_)), epoch_);
  ring(to);
}

Error Peers::aborted_error() const {
  const uint32_t* rec = word(rank_, plan().off_abort);
  uint32_t flag = load_acquire(&rec[core::kAbortFlag]);
  if (flag == 0) return ok();
  // 2: a peer is writing the record; it finishes within a few stores.
  for (int spins = 0; flag == 2 && spins < 1000000; ++spins) flag = load_acquire(&rec[core::kAbortFlag]);
  const int failed = int(rec[core::kAbortRank]);
  const int peer = rec[core::kAbortPeer] == 0xffffffffu ? -1 : int(rec[core::kAbortPeer]);
  return abandoned_error(rank_, rec[core::kAbortEpoch], failed, peer, core::WaitRole(rec[core::kAbortRole]),
                         sy_status(rec[core::kAbortStatus]));
}

void Peers::abort_all(const Error& why) {
  const int R = num_ranks();
  std::vector<uint8_t*> bases;
  {
    std::lock_guard<std::mutex> l(set_.mu);  // peers may still be joining
    bases = set_.bases;
  }
  for (int r = 0; r < R; ++r) {
    if (bases[size_t(r)] == nullptr) continue;  // never joined: nothing to tell
    uint32_t* rec = reinterpret_cast<uint32_t*>(bases[size_t(r)] + plan().off_abort);
    // Claim the record (0 -> 2 = being written); the first reason stays, later ones are dropped.
    uint32_t expected = 0;
    if (!__atomic_compare_exchange_n(&rec[core::kAbortFlag], &expected, 2u, false, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
      continue;
    }
    rec[core::kAbortRank] = uint32_t(rank_);
    rec[core::kAbortPeer] = why.wait.peer >= 0 ? uint32_t(why.wait.peer) : 0xffffffffu;
    rec[core::kAbortRole] = uint32_t(why.wait.role);
    rec[core::kAbortEpoch] = epoch_;
    rec[core::kAbortStatus] = uint32_t(why.status);
    store_release(&rec[core::kAbortFlag], 1u);
    ring(r);
  }
}

Error Peers::wait_all(uint64_t off_array, core::WaitRole role) {
  return wait_sources(off_array, role, WaitPolicy{});
}

Error Peers::wait_sources(uint64_t off_array, core::WaitRole role, const WaitPolicy& policy) {
  const int R = num_ranks();
  Deadline d = deadline();
  const double start = now_seconds();
  uint32_t* bell = word(rank_, plan().off_doorbell);
  const uint32_t* flags = word(rank_, off_array);
  auto masked = [&](int r) { return policy.mask != nullptr && load_acquire(&policy.mask[r]) != 0; };
  std::vector<char> done(size_t(R), 0);
  int pending = R;
  for (;;) {
    uint32_t ring_seen = load_acquire(bell);
    SY_TRY(aborted_error());
    for (int r = 0; r < R; ++r) {
      if (done[r]) continue;
      if (masked(r) || (policy.only != nullptr && !policy.only[r])) {
        done[r] = 1;
        --pending;
      } else if (epoch_reached(load_acquire(&flags[r]), epoch_)) {
        done[r] = 1;
        --pending;
        if (policy.waited_ns) policy.waited_ns[r] += int64_t((now_seconds() - start) * 1e9);
      }
    }
    if (pending == 0) return ok();
    double left = d.remaining_seconds();
    if (left <= 0) {
      int first = -1, missing = 0;
      std::string still;
      for (int r = 0; r < R; ++r) {
        if (done[r]) continue;
        if (first < 0) first = r;
        if (++missing <= 16) still += (still.empty() ? "" : ", ") + std::to_string(r);
        if (policy.mask_on_timeout) store_release(&policy.mask[r], 1u);
      }
      if (policy.mask_on_timeout) return ok();  // the missing ranks are masked from now on
      core::WaitFailure w;
      w.rank = rank_;
      w.peer = first;
      w.role = role;
      w.channel = first;
      w.expected = epoch_;
      w.observed = load_acquire(&flags[first]);
      w.waited_seconds = now_seconds() - start;
      return missing_ranks_error(w, epoch_, still + (missing > 16 ? ", ..." : ""));
    }
    futex_wait(bell, ring_seen, std::min(left, 0.05));
  }
}

Error Peers::stalled_error(core::WaitRole role, const Stall& s, double waited) const {
  core::WaitFailure w;
  w.rank = rank_;
  w.peer = s.peer;
  w.role = role;
  w.channel = s.peer;
  w.expected = s.expected;
  w.observed = s.observed;
  w.waited_seconds = waited;
  return timeout_error(w, "operation " + std::to_string(epoch_) + " of this buffer; missing: rank " +
                              std::to_string(s.peer), s.counter);
}

Error Peers::masked_barrier(core::OpKind kind, uint32_t* mask, bool mask_on_timeout) {
  SY_TRY(aborted_error());
  const int R = num_ranks();
  for (int r = 0; r < R; ++r) {
    if (load_acquire(&mask[r]) != 0) continue;
    store_release(word(r, core::op_slot(plan().off_op_kind, R, rank_, epoch_, 1)), uint32_t(kind));
    // Stamped like a full barrier's slot: a peer in a dispatch or combine at this epoch then
    // reports the kind mismatch, not a rank that moved on.
    uint32_t* slot = word(r, core::op_slot(plan().off_op_desc, R, rank_, epoch_, core::kDescSlotWords));
    for (int i = 0; i < core::kDescWords; ++i) slot[i] = 0u;
    slot[core::kDescEpoch] = epoch_;
    signal(r, plan().off_barrier_epoch);
  }
  return wait_sources(plan().off_barrier_epoch, core::WaitRole::Barrier, WaitPolicy{mask, mask_on_timeout, nullptr});
}

Error Peers::barrier(core::OpKind kind, const uint32_t* desc, const char* const* names) {
  SY_TRY(aborted_error());
  const int R = num_ranks();
  for (int r = 0; r < R; ++r) {
    store_release(word(r, core::op_slot(plan().off_op_kind, R, rank_, epoch_, 1)), uint32_t(kind));
    uint32_t* slot = word(r, core::op_slot(plan().off_op_desc, R, rank_, epoch_, core::kDescSlotWords));
    for (int i = 0; i < core::kDescWords; ++i) slot[i] = desc ? desc[i] : 0u;
    slot[core::kDescEpoch] = epoch_;
    signal(r, plan().off_barrier_epoch);  // release: the kind and parameters are visible first
  }
  SY_TRY(wait_all(plan().off_barrier_epoch, core::WaitRole::Barrier));
  uint32_t mine[core::kDescWords] = {uint32_t(kind)};  // without parameters, the zeros every rank wrote
  if (desc)
    for (int i = 1; i < core::kDescWords; ++i) mine[i] = desc[i];
  for (int r = 0; r < R; ++r) {
    const uint32_t* theirs = word(rank_, core::op_slot(plan().off_op_desc, R, r, epoch_, core::kDescSlotWords));
    const uint32_t k = load_acquire(word(rank_, core::op_slot(plan().off_op_kind, R, r, epoch_, 1)));
    const core::SlotCheck c = core::check_barrier_slot(mine, k, theirs, epoch_, r == rank_);
    switch (c.verdict) {
      case core::SlotVerdict::Agree: continue;
      case core::SlotVerdict::MovedOn: return peer_moved_on_error(rank_, epoch_, r, c.theirs);
      case core::SlotVerdict::OtherKind: return kind_mismatch_error(rank_, epoch_, uint32_t(kind), r, c.theirs);
      case core::SlotVerdict::Rejected: return peer_rejected_error(rank_, epoch_, uint32_t(kind), r);
      case core::SlotVerdict::OtherParameter:
        return desc_mismatch_error(rank_, epoch_, uint32_t(kind), r, names ? names[c.word] : nullptr, c.mine, c.theirs);
    }
  }
  return ok();
}

}  // namespace sy::host
