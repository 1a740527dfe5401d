// The network of the host backend: an emulated NIC that copies a record into the peer's
// window (the peer's mapped buffer: same process, or POSIX shared memory between processes) and
// counts what it carried, so that tests can check what crossed the network and how often.
//
// With a link model (the group's emulatedNic option; core/link_model.h), arrived() waits until
// the last put so far would have arrived, so a counter published after it says the data is
// there when it would be. The copies themselves run at memory speed before that.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>

#include "../abi/objects.h"
#include "../core/link_model.h"

namespace sy::host {

class EmulatedNic {
 public:
  EmulatedNic(BufferSet::NetworkCounters& counters, const core::LinkModel& model)
      : counters_(counters), model_(model) {}

  // One-sided put of `bytes` from `src` into a peer's window at `dst`.
  void put(uint8_t* dst, const void* src, size_t bytes) {
    std::memcpy(dst, src, bytes);
    counters_.records.fetch_add(1, std::memory_order_relaxed);
    counters_.puts.fetch_add(1, std::memory_order_relaxed);
    counters_.bytes.fetch_add(bytes, std::memory_order_relaxed);
    if (!model_.active()) return;
    const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
    last_arrival_ns_ = link_.send(now, bytes, model_).arrives_ns;
    modelled_ = true;
  }

  // Returns once every put so far would have arrived over the modelled link.
  void arrived() const {
    if (modelled_) std::this_thread::sleep_until(Clock::time_point(std::chrono::nanoseconds(last_arrival_ns_)));
  }

 private:
  using Clock = std::chrono::steady_clock;
  BufferSet::NetworkCounters& counters_;
  core::LinkModel model_;
  core::Link link_;
  int64_t last_arrival_ns_ = 0;
  bool modelled_ = false;
};

}  // namespace sy::host
