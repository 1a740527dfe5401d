// Errors inside the library: a status, the argument at fault, a message, and for failed waits
// the record of whom we waited for. Every C entry point turns one into sy_status and stores it
// as the last error of the handle it was called on.
#pragma once

#include <string>

#include "../core/failure.h"
#include "../core/plan.h"
#include "switchyard.h"

namespace sy {

struct Error {
  sy_status status = SY_OK;
  std::string argument;
  std::string message;
  core::WaitFailure wait;
  // Every rank of the operation learns of this failure by itself (a mismatch seen at the
  // barrier): no need to abort the peers.
  bool peers_informed = false;

  bool ok() const { return status == SY_OK; }
  explicit operator bool() const { return status != SY_OK; }  // true = failed
};

inline Error ok() { return {}; }

inline Error fail(sy_status status, std::string message, std::string argument = {}) {
  Error e;
  e.status = status;
  e.message = std::move(message);
  e.argument = std::move(argument);
  return e;
}

inline Error invalid(std::string argument, std::string message) {
  return fail(SY_ERROR_INVALID_ARGUMENT, std::move(message), std::move(argument));
}

inline Error from_problem(const core::Problem& p) {
  return p.ok() ? ok() : invalid(p.argument, p.message);
}

// Propagates a failure: `SY_TRY(expr)` returns from the enclosing function if expr failed.
#define SY_TRY(expr)                \
  do {                              \
    ::sy::Error sy_try_e_ = (expr); \
    if (sy_try_e_) return sy_try_e_; \
  } while (0)

// A point in time by which a wait must end.
struct Deadline {
  double at = 0;  // steady-clock seconds
  double ms_total = 0;
  static Deadline after_ms(int64_t ms);
  double remaining_seconds() const;
  bool expired() const { return remaining_seconds() <= 0; }
};

double now_seconds();

// Deadlines nest: a wait on the result of work that itself waits with deadline `ms` (a stream
// waiting on another's event, the host waiting on a stream or on dispatch counts) gets this much
// longer, so the inner wait's report, which names the missing peer, arrives first.
inline int64_t outer_timeout_ms(int64_t ms) { return 2 * ms + 1000; }

// A timeout error with a message that names the waiter, the peer and the counter.
// `counter` names what expected/observed count.
Error timeout_error(const core::WaitFailure& w, const std::string& what, const char* counter = "its flag");

}  // namespace sy
