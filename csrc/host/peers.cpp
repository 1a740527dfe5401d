#include "peers.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

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
  int failed = int(rec[core::kAbortRank]);
  int peer = rec[core::kAbortPeer] == 0xffffffffu ? -1 : int(rec[core::kAbortPeer]);
  auto role = core::WaitRole(rec[core::kAbortRole]);
  uint32_t epoch = rec[core::kAbortEpoch];
  auto status = sy_status(rec[core::kAbortStatus]);
  std::string msg = "rank " + std::to_string(rank_) + ": operation " + std::to_string(epoch) +
                    " of this buffer was abandoned by rank " + std::to_string(failed);
  if (status == SY_ERROR_TIMEOUT && peer >= 0) {
    msg += ", which timed out waiting for rank " + std::to_string(peer) + " in " +
           core::wait_role_name(role);
  } else if (status == SY_ERROR_INVALID_ARGUMENT) {
    msg += " because its input was invalid (see rank " + std::to_string(failed) + "'s error)";
  } else {
    msg += std::string(" (") + sy_status_name(status) + ")";
  }
  msg += "; this buffer set cannot be used again, create new buffers";
  Error e = fail(SY_ERROR_PEER_FAILED, msg);
  e.wait.rank = rank_;
  e.wait.peer = peer >= 0 ? peer : failed;
  e.wait.role = role;
  e.wait.expected = epoch;
  return e;
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
      if (masked(r)) {
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
      return timeout_error(w, "operation " + std::to_string(epoch_) + " of this buffer; missing: rank" +
                                  (missing > 1 ? "s " : " ") + still + (missing > 16 ? ", ..." : ""));
    }
    futex_wait(bell, ring_seen, std::min(left, 0.05));
  }
}

Error Peers::masked_barrier(core::OpKind kind, uint32_t* mask, bool mask_on_timeout) {
  SY_TRY(aborted_error());
  const int R = num_ranks();
  for (int r = 0; r < R; ++r) {
    if (load_acquire(&mask[r]) != 0) continue;
    store_release(word(r, plan().off_op_kind + 4ull * uint64_t(rank_)), uint32_t(kind));
    signal(r, plan().off_barrier_epoch);
  }
  return wait_sources(plan().off_barrier_epoch, core::WaitRole::Barrier, WaitPolicy{mask, mask_on_timeout, nullptr});
}

Error Peers::barrier(core::OpKind kind, const uint32_t* desc, const char* const* names) {
  SY_TRY(aborted_error());
  const int R = num_ranks();
  const uint64_t desc_bytes = 4ull * core::kDescWords;
  for (int r = 0; r < R; ++r) {
    store_release(word(r, plan().off_op_kind + 4ull * uint64_t(rank_)), uint32_t(kind));
    uint32_t* slot = word(r, plan().off_op_desc + desc_bytes * uint64_t(rank_));
    for (int i = 0; i < core::kDescWords; ++i) slot[i] = desc ? desc[i] : 0u;
    signal(r, plan().off_barrier_epoch);  // release: the kind and parameters are visible first
  }
  SY_TRY(wait_all(plan().off_barrier_epoch, core::WaitRole::Barrier));
  auto name = [](uint32_t v) {
    switch (core::OpKind(v)) {
      case core::OpKind::Dispatch: return "dispatch";
      case core::OpKind::Combine: return "combine";
      case core::OpKind::CleanLowLatency: return "cleanLowLatencyBuffer";
      default: return "nothing";
    }
  };
  const uint32_t* kinds = word(rank_, plan().off_op_kind);
  for (int r = 0; r < R; ++r) {
    uint32_t k = load_acquire(&kinds[r]);
    if (k != uint32_t(kind)) {
      Error e = fail(SY_ERROR_INVALID_ARGUMENT,
                     "rank " + std::to_string(rank_) + " called " + name(uint32_t(kind)) + " as operation " +
                         std::to_string(epoch_) + " of this buffer, but rank " + std::to_string(r) + " called " +
                         name(k) + "; every rank must call the same operations in the same order",
                     "operation");
      e.peers_informed = true;
      return e;
    }
    const uint32_t* theirs = word(rank_, plan().off_op_desc + desc_bytes * uint64_t(r));
    if (desc && theirs[core::kDescRejected] != 0 && r != rank_) {
      Error e = fail(SY_ERROR_PEER_FAILED,
                     "rank " + std::to_string(rank_) + ": rank " + std::to_string(r) + " rejected its input for " +
                         name(uint32_t(kind)) + " (operation " + std::to_string(epoch_) + "; see rank " +
                         std::to_string(r) + "'s error), so no rank ran it",
                     "operation");
      e.wait.rank = rank_;
      e.wait.peer = r;
      e.peers_informed = true;
      return e;
    }
    for (int i = 1; desc && i < core::kDescRejected; ++i) {
      if (theirs[i] == desc[i]) continue;
      Error e = fail(SY_ERROR_INVALID_ARGUMENT,
                     "rank " + std::to_string(rank_) + " and rank " + std::to_string(r) + " called " +
                         name(uint32_t(kind)) + " (operation " + std::to_string(epoch_) + ") with different " +
                         (names && names[i] ? names[i] : "parameters") + " (" + std::to_string(desc[i]) + " vs " +
                         std::to_string(theirs[i]) + "); every rank must pass matching arguments",
                     "operation");
      e.peers_informed = true;
      return e;
    }
  }
  return ok();
}

}  // namespace sy::host
