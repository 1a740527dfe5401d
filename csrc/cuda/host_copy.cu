// Copies between host memory and the GPU through pinned chunks (host_copy.h).
#include "host_copy.h"

#include <algorithm>
#include <cstring>

#include "cuda_check.h"
#include "cuda_objects.h"
#include "device_memory.h"

namespace sy::cuda {

// The (at most two) chunks one copy holds; back to the pool when the copy ends, however it
// ends. A chunk whose copy was enqueued without its event goes nowhere: it could be in flight.
class StagingPool::Held {
 public:
  explicit Held(StagingPool& pool) : pool_(pool) {}
  ~Held() {
    for (int i = 0; i < n_; ++i)
      if (ok_[i]) pool_.give(c_[i]);
  }
  // Chunk k of the copy (k counts from 0): a fresh one for the first two, then they alternate.
  Error chunk(uint64_t k, Chunk** out) {
    const int i = int(k % 2);
    if (k < 2) {
      SY_TRY(pool_.take(&c_[i]));
      ok_[i] = true;
      n_ = i + 1;
    }
    *out = &c_[i];
    return ok();
  }
  // The chunk was enqueued (false) and then its event recorded (true).
  void settled(const Chunk* c, bool recorded) { ok_[c == &c_[0] ? 0 : 1] = recorded; }

 private:
  StagingPool& pool_;
  Chunk c_[2];
  bool ok_[2] = {false, false};
  int n_ = 0;
};

StagingPool::~StagingPool() {
  cudaSetDevice(device_);
  for (const Chunk& c : all_) {
    cudaEventDestroy(c.done);                 // legal while a record is pending
    release_pinned_memory(c.host, device_);  // once every copy queued so far has completed
  }
}

Error StagingPool::grow() {
  SY_CUDA(cudaSetDevice(device_));
  Chunk c;
  SY_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&c.host), kChunkBytes, cudaHostAllocDefault));
  if (cudaEventCreateWithFlags(&c.done, cudaEventDisableTiming) != cudaSuccess) {
    const cudaError_t rc = cudaGetLastError();
    release_pinned_memory(c.host, device_);
    return cuda_error(rc, "creating a staging chunk's event");
  }
  all_.push_back(c);
  free_.push_back(c);
  return ok();
}

Error StagingPool::reserve() {
  std::lock_guard<std::mutex> l(mu_);
  while (free_.size() < 2) SY_TRY(grow());
  return ok();
}

Error StagingPool::take(Chunk* out) {
  std::lock_guard<std::mutex> l(mu_);
  size_t pick = free_.size();
  for (size_t i = 0; i < free_.size(); ++i) {
    if (cudaEventQuery(free_[i].done) != cudaErrorNotReady) {
      pick = i;
      break;
    }
  }
  (void)cudaGetLastError();
  if (pick == free_.size()) {
    SY_TRY(grow());
    pick = free_.size() - 1;
  }
  *out = free_[pick];
  free_[pick] = free_.back();
  free_.pop_back();
  return ok();
}

void StagingPool::give(const Chunk& c) {
  std::lock_guard<std::mutex> l(mu_);
  free_.push_back(c);
}

Error StagingPool::to_device(void* dst, const void* src, uint64_t bytes, cudaStream_t stream, Deadline deadline,
                             int rank) {
  SY_CUDA(cudaSetDevice(device_));
  Held held(*this);
  for (uint64_t off = 0, k = 0; off < bytes; ++k) {
    Chunk* c = nullptr;
    SY_TRY(held.chunk(k, &c));
    // The chunk's previous copy (two chunks ago) must be over before it is refilled.
    if (k >= 2) {
      SY_TRY(poll([&] { return cudaEventQuery(c->done); }, deadline, rank, core::WaitRole::Stream,
                  "copy to the device"));
    }
    const uint64_t n = std::min(kChunkBytes, bytes - off);
    std::memcpy(c->host, static_cast<const uint8_t*>(src) + off, n);
    held.settled(c, false);
    SY_CUDA(cudaMemcpyAsync(static_cast<uint8_t*>(dst) + off, c->host, n, cudaMemcpyHostToDevice, stream));
    SY_CUDA(cudaEventRecord(c->done, stream));
    held.settled(c, true);
    off += n;
  }
  return ok();
}

Error StagingPool::to_host(void* dst, const void* src, uint64_t bytes, cudaStream_t stream, Deadline deadline,
                           int rank) {
  SY_CUDA(cudaSetDevice(device_));
  Held held(*this);
  Chunk* pending = nullptr;  // enqueued, not yet copied out
  uint64_t pending_off = 0, pending_n = 0;
  auto drain = [&]() -> Error {
    SY_TRY(poll([&] { return cudaEventQuery(pending->done); }, deadline, rank, core::WaitRole::Stream,
                "copy to the host"));
    std::memcpy(static_cast<uint8_t*>(dst) + pending_off, pending->host, pending_n);
    pending = nullptr;
    return ok();
  };
  for (uint64_t off = 0, k = 0; off < bytes; ++k) {
    Chunk* c = nullptr;
    SY_TRY(held.chunk(k, &c));
    const uint64_t n = std::min(kChunkBytes, bytes - off);
    held.settled(c, false);
    SY_CUDA(cudaMemcpyAsync(c->host, static_cast<const uint8_t*>(src) + off, n, cudaMemcpyDeviceToHost, stream));
    SY_CUDA(cudaEventRecord(c->done, stream));
    held.settled(c, true);
    if (pending) SY_TRY(drain());  // the previous chunk, while this one is in flight
    pending = c;
    pending_off = off;
    pending_n = n;
    off += n;
  }
  return pending ? drain() : ok();
}

}  // namespace sy::cuda
