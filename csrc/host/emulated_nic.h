// The network of the host backend: an emulated NIC that copies a record into the peer's
// window (the peer's mapped buffer: same process, or POSIX shared memory between processes) and
// counts what it carried, so that tests can check what crossed the network and how often.
//
// With a link model (the group's emulatedNic option), each put leaves on this rank's link of
// `bytes_per_second` once the link is free (or at once, if it has been idle) and arrives
// `latency_ns` after it has left; arrived() waits until the last put so far would have arrived,
// so a counter published after it says the data is there when it would be. The copies
// themselves run at memory speed before that.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>

#include "../abi/objects.h"

namespace sy::host {

class EmulatedNic {
 public:
  EmulatedNic(BufferSet::NetworkCounters& counters, const BufferSet::NicModel& model)
      : counters_(counters), model_(model) {}

  // One-sided put of `bytes` from `src` into a peer's window at `dst`.
  void put(uint8_t* dst, const void* src, size_t bytes) {
    std::memcpy(dst, src, bytes);
    counters_.records.fetch_add(1, std::memory_order_relaxed);
    counters_.bytes.fetch_add(bytes, std::memory_order_relaxed);
    if (model_.bytes_per_second <= 0 && model_.latency_ns <= 0) return;
    const Clock::time_point now = Clock::now();
    const double wire = model_.bytes_per_second > 0 ? double(bytes) / model_.bytes_per_second : 0.0;
    link_free_ = std::max(link_free_, now) + seconds(wire);
    last_arrival_ = link_free_ + std::chrono::nanoseconds(model_.latency_ns);
    modelled_ = true;
  }

  // Returns once every put so far would have arrived over the modelled link.
  void arrived() const {
    if (modelled_) std::this_thread::sleep_until(last_arrival_);
  }

 private:
  using Clock = std::chrono::steady_clock;
  static Clock::duration seconds(double s) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
  }
  BufferSet::NetworkCounters& counters_;
  BufferSet::NicModel model_;
  Clock::time_point link_free_{}, last_arrival_{};
  bool modelled_ = false;
};

}  // namespace sy::host
