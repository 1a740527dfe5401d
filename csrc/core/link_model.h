// The emulated NIC's link model, shared by the host backend's NIC and the CUDA backend's proxy:
// one link per rank, which carries one put at a time. A put leaves once the link is free (at
// once, if it has been idle), occupies it for bytes / bandwidth, and arrives `latency_ns` after
// its last byte left. So a chain through k nodes pays k latencies, and a rank that puts more
// bytes waits longer, as on a NIC of that line rate.
#pragma once

#include <atomic>
#include <cstdint>

#include "hd.h"

namespace sy::core {

struct LinkModel {
  double bytes_per_second = 0;  // 0: memory speed
  int64_t latency_ns = 0;
  SY_HD bool active() const { return bytes_per_second > 0 || latency_ns > 0; }
};

// What an emulated NIC carried for one rank (tests and benchmarks count what crossed the network):
// entries (dispatch records, combine entries), their bytes, and the puts that carried them (one
// put may carry a run of entries: sy_network_stats).
struct NetworkCounters {
  std::atomic<uint64_t> records{0}, bytes{0}, puts{0};
};

// When one put is on the wire, in nanoseconds of the caller's clock.
struct LinkTimes {
  int64_t leaves_ns = 0;    // its first byte leaves
  int64_t left_ns = 0;      // its last byte has left: the link is free again
  int64_t arrives_ns = 0;   // its last byte is in the peer's window
};

// A rank's link: when it is next free.
struct Link {
  int64_t free_ns = 0;
  // The times of a put of `bytes` offered at `now_ns`; the link is busy until it has left.
  SY_HD LinkTimes send(int64_t now_ns, uint64_t bytes, const LinkModel& m) {
    LinkTimes t;
    t.leaves_ns = free_ns > now_ns ? free_ns : now_ns;
    const double wire_ns = m.bytes_per_second > 0 ? double(bytes) * 1e9 / m.bytes_per_second : 0.0;
    t.left_ns = t.leaves_ns + int64_t(wire_ns);
    t.arrives_ns = t.left_ns + m.latency_ns;
    free_ns = t.left_ns;
    return t;
  }
};

}  // namespace sy::core
