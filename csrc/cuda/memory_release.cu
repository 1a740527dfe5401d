#include "memory_release.h"

#include <map>
#include <mutex>
#include <vector>

namespace sy::cuda {

namespace {

// Pending frees beyond this many are issued at once.
constexpr size_t kBatch = 32;

struct DeviceState {
  cudaStream_t release = nullptr;  // waits for the marked work, then frees
  cudaEvent_t marker = nullptr;    // recorded on this device's streams, one at a time
  std::vector<void*> pending;
};

struct Releaser {
  std::mutex mu;
  std::vector<std::pair<cudaStream_t, int>> streams;
  std::map<int, DeviceState> devices;

  // (mu held) The device's state, created on first use; nullptr if CUDA refuses.
  DeviceState* state(int device) {
    DeviceState& d = devices[device];
    if (d.release == nullptr) {
      if (cudaSetDevice(device) != cudaSuccess ||
          cudaStreamCreateWithFlags(&d.release, cudaStreamNonBlocking) != cudaSuccess ||
          cudaEventCreateWithFlags(&d.marker, cudaEventDisableTiming) != cudaSuccess) {
        cudaGetLastError();
        return nullptr;
      }
    }
    return &d;
  }

  // (mu held) Makes `device`'s release stream wait for the work queued so far on `stream`.
  void order_after(int device, cudaStream_t stream, int stream_device) {
    DeviceState* mark = state(stream_device);
    DeviceState* rel = state(device);
    if (mark == nullptr || rel == nullptr) return;
    cudaSetDevice(stream_device);
    if (cudaEventRecord(mark->marker, stream) == cudaSuccess) {
      cudaSetDevice(device);
      cudaStreamWaitEvent(rel->release, mark->marker, 0);
    }
    cudaGetLastError();
  }

  // (mu held)
  void flush(int device) {
    DeviceState* d = state(device);
    if (d == nullptr || d->pending.empty()) return;
    for (const auto& [s, dev] : streams) order_after(device, s, dev);
    cudaSetDevice(device);
    for (void* p : d->pending) cudaFreeAsync(p, d->release);
    d->pending.clear();
    cudaGetLastError();
  }
};

// Never destroyed: at process exit CUDA may already be gone.
Releaser& releaser() {
  static Releaser* r = new Releaser();
  return *r;
}

// Keeps the calling thread's current device across the releaser's device switches.
struct KeepDevice {
  int device = 0;
  KeepDevice() { cudaGetDevice(&device); }
  ~KeepDevice() { cudaSetDevice(device); }
};

}  // namespace

void track_stream(cudaStream_t stream, int device) {
  Releaser& r = releaser();
  std::lock_guard<std::mutex> l(r.mu);
  r.streams.emplace_back(stream, device);
}

void untrack_stream(cudaStream_t stream, int device) {
  Releaser& r = releaser();
  KeepDevice keep;
  std::lock_guard<std::mutex> l(r.mu);
  for (auto& [dev, d] : r.devices) {
    (void)d;
    r.order_after(dev, stream, device);  // the release streams now wait for its tail
  }
  for (size_t i = 0; i < r.streams.size(); ++i) {
    if (r.streams[i].first == stream) {
      r.streams[i] = r.streams.back();
      r.streams.pop_back();
      break;
    }
  }
}

void release_device_memory(void* ptr, int device) {
  Releaser& r = releaser();
  KeepDevice keep;
  std::lock_guard<std::mutex> l(r.mu);
  DeviceState* d = r.state(device);
  if (d == nullptr) return;  // CUDA is gone: nothing to give back to
  d->pending.push_back(ptr);
  if (d->pending.size() >= kBatch) r.flush(device);
}

void flush_releases(int device) {
  Releaser& r = releaser();
  KeepDevice keep;
  std::lock_guard<std::mutex> l(r.mu);
  r.flush(device);
}

}  // namespace sy::cuda
