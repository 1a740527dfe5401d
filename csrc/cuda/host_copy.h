// Copies between host memory and the GPU through pinned chunks of the rank's own, never through
// the driver's pageable path. A pageable copy is staged by the driver, which serializes such
// copies across the context: a read waiting for a rank whose kernel waits for a peer would then
// hold up that peer's upload, so the peer never enqueues the kernel it is waited for (seen on
// an H200: virtual ranks whose uploads overlapped a peer's read timed out after the deadline).
// Chunks are pinned once and kept (cudaFreeHost may wait for the whole device); a chunk is
// handed out again only once the copy that last used it has completed (its event).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "../abi/objects.h"

namespace sy::cuda {

class StagingPool {
 public:
  explicit StagingPool(int device) : device_(device) {}
  ~StagingPool();
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  // Pins the chunks one copy uses up front: the first copy of a rank may come while a peer's
  // kernel waits, and pinning can wait for the device.
  Error reserve();
  // Copies `bytes` from host `src` to device `dst` in the order of `stream`; returns once `src`
  // may be reused (the copy itself may still be in flight). Waits (polling, until `deadline`)
  // only for this call's own earlier chunks.
  Error to_device(void* dst, const void* src, uint64_t bytes, cudaStream_t stream, Deadline deadline, int rank);
  // Copies `bytes` from device `src` to host `dst` in the order of `stream`; returns once `dst`
  // holds them, or with a timeout naming `rank` when the stream has not got there by `deadline`.
  Error to_host(void* dst, const void* src, uint64_t bytes, cudaStream_t stream, Deadline deadline, int rank);

  // Bytes per chunk; a copy holds two at a time (one filling while the other is in flight).
  static constexpr uint64_t kChunkBytes = 1ull << 20;

 private:
  struct Chunk {
    uint8_t* host = nullptr;
    cudaEvent_t done = nullptr;  // recorded after the chunk's last copy
  };
  class Held;
  Error take(Chunk* out);    // a chunk whose last copy is over, pinning a new one if none is
  void give(const Chunk& c);  // back to the pool; reusable once its event has completed
  Error grow();               // (mu_ held) pins one more chunk

  int device_;
  std::mutex mu_;
  std::vector<Chunk> free_;
  std::vector<Chunk> all_;
};

}  // namespace sy::cuda
