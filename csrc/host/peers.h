// The host backend's side of the peer protocol: flags in the peers' buffer headers, written
// with release stores and waited for with acquire loads, every wait bounded by a deadline and
// able to say whom it waited for. The header layout comes from core::BufferPlan.
#pragma once

#include <cstdint>

#include "../abi/objects.h"
#include "futex.h"

namespace sy::host {

class Peers {
 public:
  Peers(BufferSet& set, int rank, int64_t timeout_ms, uint32_t epoch);

  int rank() const { return rank_; }
  int num_ranks() const { return int(set_.bases.size()); }
  uint32_t epoch() const { return epoch_; }
  const core::BufferPlan& plan() const { return set_.plan; }
  BufferSet& set() const { return set_; }
  uint8_t* base(int r) const { return set_.bases[r]; }
  Deadline deadline() const { return Deadline::after_ms(timeout_ms_); }

  // Waits until every rank (but the masked ones) has created its buffer of this set.
  Error wait_joined(const uint32_t* mask = nullptr);
  // Everyone has entered operation `epoch` of kind `kind` (and has left the previous one, so
  // every region may be written again). Reports mismatched operations, and parameters that
  // differ from this rank's (`desc`, kDescWords words; `names` says what each word is).
  Error barrier(core::OpKind kind, const uint32_t* desc = nullptr, const char* const* names = nullptr);
  // The barrier of a buffer with masking: masked ranks are neither signalled nor waited for,
  // and with `mask_on_timeout` the ranks missing at the deadline are masked.
  struct WaitPolicy;
  Error masked_barrier(core::OpKind kind, uint32_t* mask, bool mask_on_timeout);
  // Sets my flag in rank `to`'s array at `off_array` to this epoch and rings its doorbell.
  void signal(int to, uint64_t off_array);
  // Waits until every peer's flag in my array at `off_array` has reached this epoch.
  Error wait_all(uint64_t off_array, core::WaitRole role);
  // The same with a mask: masked ranks are not waited for; with `mask_on_timeout` the ranks
  // missing at the deadline are masked instead of failing; `waited_ns` (if set) accumulates how
  // long each rank was waited for.
  struct WaitPolicy {
    uint32_t* mask = nullptr;
    bool mask_on_timeout = false;
    int64_t* waited_ns = nullptr;
    const uint8_t* only = nullptr;  // [R]: wait for these ranks alone (nullptr: every rank)
  };
  Error wait_sources(uint64_t off_array, core::WaitRole role, const WaitPolicy& policy);
  // Reads my flag from `r` in the array at `off_array`.
  uint32_t flag_from(int r, uint64_t off_array) const {
    return load_acquire(word(rank_, off_array + 4ull * uint64_t(r)));
  }
  // Gives up on this operation: tells every rank why, so nobody waits for us.
  void abort_all(const Error& why);

  // Waits on counters rather than flags (the network rings): `step` does what it can and says
  // whether it moved anything; between steps that did not, this rank sleeps on its doorbell.
  // After the deadline without progress it fails, naming the rank `stalled` says it waited for.
  struct Stall {
    int peer = -1;
    int64_t expected = 0, observed = 0;
    const char* counter = "its counter";  // what expected/observed count
  };
  enum class Step { Moved, Idle, Done };
  template <class StepFn, class Stalled>
  Error progress(core::WaitRole role, StepFn step, Stalled stalled);
  // Bumps `owner`'s doorbell and wakes its waiters (after writing into its header).
  void ring(int owner);
  uint32_t* word(int owner, uint64_t off) const {
    return reinterpret_cast<uint32_t*>(base(owner) + off);
  }

 private:
  Error aborted_error() const;  // SY_OK unless my header holds an abort record
  Error stalled_error(core::WaitRole role, const Stall& s, double waited) const;

  BufferSet& set_;
  int rank_;
  int64_t timeout_ms_;
  uint32_t epoch_;
};

// The i32 array at `off` of a buffer mapped at `base`.
inline int32_t* i32_at(uint8_t* base, uint64_t off) { return reinterpret_cast<int32_t*>(base + off); }

template <class StepFn, class Stalled>
Error Peers::progress(core::WaitRole role, StepFn step, Stalled stalled) {
  uint32_t* bell = word(rank_, plan().off_doorbell);
  Deadline d = deadline();
  double since = now_seconds();
  for (;;) {
    const uint32_t seen = load_acquire(bell);
    SY_TRY(aborted_error());
    Step s = Step::Idle;
    SY_TRY(step(&s));
    if (s == Step::Done) return ok();
    if (s == Step::Moved) {  // the deadline counts from the last progress
      d = deadline();
      since = now_seconds();
      continue;
    }
    const double left = d.remaining_seconds();
    if (left <= 0) return stalled_error(role, stalled(), now_seconds() - since);
    futex_wait(bell, seen, left < 0.05 ? left : 0.05);
  }
}

// Epochs wrap around; "a has reached b" is a signed comparison of the difference.
inline bool epoch_reached(uint32_t value, uint32_t epoch) { return int32_t(value - epoch) >= 0; }

}  // namespace sy::host
