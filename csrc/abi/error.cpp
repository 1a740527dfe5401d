#include "error.h"

#include <chrono>
#include <cstdio>

namespace sy {

double now_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

Deadline Deadline::after_ms(int64_t ms) {
  Deadline d;
  d.at = now_seconds() + double(ms) / 1000.0;
  d.ms_total = double(ms);
  return d;
}

double Deadline::remaining_seconds() const { return at - now_seconds(); }

Error timeout_error(const core::WaitFailure& w, const std::string& what) {
  char buf[768];
  if (w.peer >= 0) {
    std::snprintf(buf, sizeof buf,
                  "rank %d timed out after %.3f s waiting for rank %d in %s (%s; its flag: "
                  "expected %lld, saw %lld)",
                  w.rank, w.waited_seconds, w.peer, core::wait_role_name(w.role), what.c_str(),
                  (long long)w.expected, (long long)w.observed);
  } else {
    std::snprintf(buf, sizeof buf, "rank %d timed out after %.3f s waiting for %s (%s)", w.rank,
                  w.waited_seconds, core::wait_role_name(w.role), what.c_str());
  }
  Error e = fail(SY_ERROR_TIMEOUT, buf);
  e.wait = w;
  return e;
}

}  // namespace sy
