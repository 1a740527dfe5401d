#include "device_memory.h"

#include <map>
#include <mutex>
#include <vector>

namespace sy::cuda {

namespace {

// Pending frees beyond this many are issued at once.
constexpr size_t kBatch = 32;

struct DeviceState {
  bool ready = false;
  cudaStream_t alloc = nullptr;    // allocations and their zero fill
  cudaStream_t release = nullptr;  // waits for the marked work, then frees
  cudaEvent_t marker = nullptr;    // recorded on this device's streams, one at a time
  std::vector<void*> pending;
};

// Keeps the calling thread's current device across the switches below.
struct KeepDevice {
  int device = 0;
  KeepDevice() { cudaGetDevice(&device); }
  ~KeepDevice() { cudaSetDevice(device); }
};

struct DeviceMemory {
  std::mutex mu;  // a leaf: nothing else is locked, and no Memory is destroyed, under it
  std::vector<std::pair<cudaStream_t, int>> streams;
  std::map<int, DeviceState> devices;

  // (mu held) The device's state, set up completely on first use; nullptr if CUDA refuses.
  DeviceState* state(int device) {
    DeviceState& d = devices[device];
    if (d.ready) return &d;
    if (cudaSetDevice(device) != cudaSuccess) return nullptr;
    if (d.alloc == nullptr && cudaStreamCreateWithFlags(&d.alloc, cudaStreamNonBlocking) != cudaSuccess) d.alloc = nullptr;
    if (d.release == nullptr && cudaStreamCreateWithFlags(&d.release, cudaStreamNonBlocking) != cudaSuccess) {
      d.release = nullptr;
    }
    if (d.marker == nullptr && cudaEventCreateWithFlags(&d.marker, cudaEventDisableTiming) != cudaSuccess) {
      d.marker = nullptr;
    }
    d.ready = d.alloc != nullptr && d.release != nullptr && d.marker != nullptr;
    cudaGetLastError();
    return d.ready ? &d : nullptr;
  }

  // (mu held) Makes `device`'s release stream wait for the work queued so far on `stream`.
  bool order_after(int device, cudaStream_t stream, int stream_device) {
    DeviceState* mark = state(stream_device);
    DeviceState* rel = state(device);
    if (mark == nullptr || rel == nullptr) return false;
    bool ok = cudaSetDevice(stream_device) == cudaSuccess && cudaEventRecord(mark->marker, stream) == cudaSuccess &&
              cudaSetDevice(device) == cudaSuccess && cudaStreamWaitEvent(rel->release, mark->marker, 0) == cudaSuccess;
    cudaGetLastError();
    return ok;
  }

  // (mu held) Issues the pending frees of `device`; keeps them if their order cannot be set up.
  void flush(int device) {
    DeviceState* d = state(device);
    if (d == nullptr || d->pending.empty()) return;
    for (const auto& [s, dev] : streams)
      if (!order_after(device, s, dev)) return;  // try again at the next flush
    cudaSetDevice(device);
    for (void* p : d->pending) cudaFreeAsync(p, d->release);
    d->pending.clear();
    cudaGetLastError();
  }
};

// Never destroyed: at process exit CUDA may already be gone.
DeviceMemory& memory() {
  static DeviceMemory* m = new DeviceMemory();
  return *m;
}

}  // namespace

cudaError_t allocate_device_memory(int device, uint64_t bytes, void** out) {
  DeviceMemory& m = memory();
  KeepDevice keep;
  cudaStream_t s = nullptr;
  {
    std::lock_guard<std::mutex> l(m.mu);
    DeviceState* d = m.state(device);
    if (d == nullptr) return cudaErrorInitializationError;
    m.flush(device);  // what was given back is reused once its last user is done
    s = d->alloc;
  }
  cudaError_t rc = cudaSetDevice(device);
  if (rc == cudaSuccess) rc = cudaMallocAsync(out, bytes, s);
  if (rc != cudaSuccess) return rc;
  rc = cudaMemsetAsync(*out, 0, bytes, s);
  if (rc == cudaSuccess) rc = cudaStreamSynchronize(s);
  if (rc != cudaSuccess) {
    cudaFreeAsync(*out, s);
    *out = nullptr;
  }
  return rc;
}

void release_device_memory(void* ptr, int device) {
  DeviceMemory& m = memory();
  KeepDevice keep;
  std::lock_guard<std::mutex> l(m.mu);
  DeviceState* d = m.state(device);
  if (d == nullptr) return;  // CUDA is gone: nothing to give back to
  d->pending.push_back(ptr);
  if (d->pending.size() >= kBatch) m.flush(device);
}

void track_stream(cudaStream_t stream, int device) {
  DeviceMemory& m = memory();
  std::lock_guard<std::mutex> l(m.mu);
  m.streams.emplace_back(stream, device);
}

void untrack_stream(cudaStream_t stream, int device) {
  DeviceMemory& m = memory();
  KeepDevice keep;
  std::lock_guard<std::mutex> l(m.mu);
  for (auto& entry : m.devices) m.order_after(entry.first, stream, device);  // its tail stays a dependency
  for (size_t i = 0; i < m.streams.size(); ++i) {
    if (m.streams[i].first == stream) {
      m.streams[i] = m.streams.back();
      m.streams.pop_back();
      break;
    }
  }
}

int streams_on(int device) {
  DeviceMemory& m = memory();
  std::lock_guard<std::mutex> l(m.mu);
  int n = 2;
  for (const auto& [s, dev] : m.streams) n += dev == device ? 1 : 0;
  return n;
}

}  // namespace sy::cuda
