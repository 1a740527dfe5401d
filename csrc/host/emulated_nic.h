// The network of the host backend: an emulated NIC that copies a record into the peer's
// window (the peer's mapped buffer: same process, or POSIX shared memory between processes) and
// counts what it carried, so that tests can check what crossed the network and how often.
//
// With a link model (the group's emulatedNic option), the puts of one operation leave one after
// another on this rank's link of `bytes_per_second` and arrive `latency_ns` later; arrived()
// waits until the last of them would have, so a flag raised after it is raised when the data
// would be there. The copies themselves run at memory speed before that.
#pragma once

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
      : counters_(counters), model_(model), started_(std::chrono::steady_clock::now()) {}

  // One-sided put of `bytes` from `src` into a peer's window at `dst`.
  void put(uint8_t* dst, const void* src, size_t bytes) {
    std::memcpy(dst, src, bytes);
    counters_.records.fetch_add(1, std::memory_order_relaxed);
    counters_.bytes.fetch_add(bytes, std::memory_order_relaxed);
    bytes_ += bytes;
    ++puts_;
  }

  // Returns once every put so far would have arrived over the modelled link.
  void arrived() const {
    if (puts_ == 0 || (model_.bytes_per_second <= 0 && model_.latency_ns <= 0)) return;
    const double seconds = (model_.bytes_per_second > 0 ? double(bytes_) / model_.bytes_per_second : 0.0) +
                           double(model_.latency_ns) * 1e-9;
    std::this_thread::sleep_until(started_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                 std::chrono::duration<double>(seconds)));
  }

 private:
  BufferSet::NetworkCounters& counters_;
  BufferSet::NicModel model_;
  std::chrono::steady_clock::time_point started_;
  uint64_t bytes_ = 0;
  uint64_t puts_ = 0;
};

}  // namespace sy::host
