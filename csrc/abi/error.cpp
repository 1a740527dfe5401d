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

Error timeout_error(const core::WaitFailure& w, const std::string& what, const char* counter) {
  char buf[768];
  if (w.peer >= 0) {
    std::snprintf(buf, sizeof buf,
                  "rank %d timed out after %.3f s waiting for rank %d in %s (%s; %s: "
                  "expected %lld, saw %lld)",
                  w.rank, w.waited_seconds, w.peer, core::wait_role_name(w.role), what.c_str(), counter,
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

// The status names of the C ABI (switchyard.h).
extern "C" SY_API const char* sy_status_name(int32_t status) {
  switch (status) {
    case SY_OK: return "OK";
    case SY_NOT_READY: return "NOT_READY";
    case SY_ERROR_INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case SY_ERROR_WRONG_HANDLE: return "WRONG_HANDLE";
    case SY_ERROR_DISPOSED: return "DISPOSED";
    case SY_ERROR_OUT_OF_MEMORY: return "OUT_OF_MEMORY";
    case SY_ERROR_NO_DEVICE: return "NO_DEVICE";
    case SY_ERROR_UNSUPPORTED: return "UNSUPPORTED";
    case SY_ERROR_TIMEOUT: return "TIMEOUT";
    case SY_ERROR_PEER_FAILED: return "PEER_FAILED";
    case SY_ERROR_CUDA: return "CUDA";
    case SY_ERROR_ABI_MISMATCH: return "ABI_MISMATCH";
    case SY_ERROR_INTERNAL: return "INTERNAL";
    default: return "UNKNOWN";
  }
}
