#include "peers.h"

#include <algorithm>
#include <chrono>
#include <string>

#include "futex.h"

namespace sy::host {

Peers::Peers(BufferSet& set, int rank, int64_t timeout_ms, uint32_t epoch)
    : set_(set), rank_(rank), timeout_ms_(timeout_ms), epoch_(epoch) {}

Error Peers::wait_joined() {
  std::unique_lock<std::mutex> l(set_.mu);
  Deadline d = deadline();
  double start = now_seconds();
  const int R = num_ranks();
  while (set_.joined < R) {
    double left = d.remaining_seconds();
    if (left <= 0) {
      std::string missing;
      int first = -1;
      for (int r = 0; r < R; ++r) {
        if (set_.bases[r] != nullptr) continue;
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
  if (load_acquire(&rec[core::kAbortFlag]) == 0) return ok();
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
  for (int r = 0; r < R; ++r) {
    if (base(r) == nullptr) continue;  // never joined: nothing to tell
    uint32_t* rec = word(r, plan().off_abort);
    if (load_acquire(&rec[core::kAbortFlag]) != 0) continue;  // the first reason stays
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
  const int R = num_ranks();
  Deadline d = deadline();
  double start = now_seconds();
  uint32_t* bell = word(rank_, plan().off_doorbell);
  const uint32_t* flags = word(rank_, off_array);
  int next = 0;  // peers below `next` have all arrived
  for (;;) {
    uint32_t ring_seen = load_acquire(bell);
    SY_TRY(aborted_error());
    while (next < R && epoch_reached(load_acquire(&flags[next]), epoch_)) ++next;
    if (next == R) return ok();
    double left = d.remaining_seconds();
    if (left <= 0) {
      core::WaitFailure w;
      w.rank = rank_;
      w.peer = next;
      w.role = role;
      w.channel = next;
      w.expected = epoch_;
      w.observed = load_acquire(&flags[next]);
      w.waited_seconds = now_seconds() - start;
      std::string still;
      int missing = 0;
      for (int r = next; r < R; ++r) {
        if (epoch_reached(load_acquire(&flags[r]), epoch_)) continue;
        missing += 1;
        if (missing <= 16) still += (still.empty() ? "" : ", ") + std::to_string(r);
      }
      return timeout_error(w, "operation " + std::to_string(epoch_) + " of this buffer; missing: rank" +
                                  (missing > 1 ? "s " : " ") + still + (missing > 16 ? ", ..." : ""));
    }
    futex_wait(bell, ring_seen, std::min(left, 0.05));
  }
}

Error Peers::barrier(core::OpKind kind) {
  SY_TRY(aborted_error());
  const int R = num_ranks();
  for (int r = 0; r < R; ++r) {
    store_release(word(r, plan().off_op_kind + 4ull * uint64_t(rank_)), uint32_t(kind));
    signal(r, plan().off_barrier_epoch);
  }
  SY_TRY(wait_all(plan().off_barrier_epoch, core::WaitRole::Barrier));
  const uint32_t* kinds = word(rank_, plan().off_op_kind);
  for (int r = 0; r < R; ++r) {
    uint32_t k = load_acquire(&kinds[r]);
    if (k != uint32_t(kind)) {
      auto name = [](uint32_t v) {
        return v == uint32_t(core::OpKind::Dispatch)  ? "dispatch"
               : v == uint32_t(core::OpKind::Combine) ? "combine"
                                                       : "nothing";
      };
      return fail(SY_ERROR_INVALID_ARGUMENT,
                  "rank " + std::to_string(rank_) + " called " + name(uint32_t(kind)) +
                      " as operation " + std::to_string(epoch_) + " of this buffer, but rank " +
                      std::to_string(r) + " called " + name(k) +
                      "; every rank must call the same operations in the same order",
                  "operation");
    }
  }
  return ok();
}

}  // namespace sy::host
