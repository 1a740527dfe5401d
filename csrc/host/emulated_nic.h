// The network of the host backend: an emulated NIC that copies a record into the peer's
// window (the peer's mapped buffer: same process, or POSIX shared memory between processes) and
// counts what it carried, so that tests can check what crossed the network and how often.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../abi/objects.h"

namespace sy::host {

class EmulatedNic {
 public:
  explicit EmulatedNic(BufferSet::NetworkCounters& counters) : counters_(counters) {}

  // One-sided put of `bytes` from `src` into a peer's window at `dst`.
  void put(uint8_t* dst, const void* src, size_t bytes) {
    std::memcpy(dst, src, bytes);
    counters_.records.fetch_add(1, std::memory_order_relaxed);
    counters_.bytes.fetch_add(bytes, std::memory_order_relaxed);
  }

 private:
  BufferSet::NetworkCounters& counters_;
};

}  // namespace sy::host
