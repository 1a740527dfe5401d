#include "device_memory.h"

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace sy::cuda {

namespace {

// Releases gathered before their markers are recorded.
constexpr size_t kBatch = 32;

// A marker event, destroyed with its last holder.
struct Marker {
  cudaEvent_t event = nullptr;
  ~Marker() {
    if (event) cudaEventDestroy(event);
  }
  bool complete() const { return cudaEventQuery(event) != cudaErrorNotReady; }
};

// Memory given back: device memory from the pool, or pinned host memory.
struct Release {
  void* pointer;
  bool pinned;
};

// Releases to carry out once every marker has completed.
struct Batch {
  std::vector<Release> releases;
  std::vector<std::shared_ptr<Marker>> markers;
};

struct DeviceState {
  bool ready = false;
  cudaStream_t alloc = nullptr;  // allocations, their zero fill, and the frees
  std::vector<Release> pending;  // released, batch not sealed yet
  std::vector<Batch> batches;    // sealed, waiting for their markers
  std::vector<cudaStream_t> idle_streams;
  int live_streams = 0;
};

// Keeps the calling thread's current device across the switches below.
struct KeepDevice {
  int device = 0;
  KeepDevice() { cudaGetDevice(&device); }
  ~KeepDevice() { cudaSetDevice(device); }
};

struct DeviceMemory {
  std::mutex mu;  // a leaf: nothing else is locked, and no Memory is destroyed, under it
  std::vector<std::pair<cudaStream_t, int>> streams;  // live library streams
  std::vector<std::shared_ptr<Marker>> tails;         // the last work of returned streams
  std::map<int, DeviceState> devices;
  // Pinned memory whose work is done, freed by the reaper: cudaFreeHost may wait for the whole
  // device, which no thread that enqueues work may do (device_memory.h).
  std::vector<std::pair<void*, int>> reap;
  int pinned_pending = 0;  // pinned releases not yet handed to the reaper
  std::condition_variable reaper_wakes;
  bool reaper_started = false;

  // (mu held) The device's state, set up on first use; nullptr if CUDA refuses.
  DeviceState* state(int device) {
    DeviceState& d = devices[device];
    if (d.ready) return &d;
    if (cudaSetDevice(device) == cudaSuccess && cudaStreamCreateWithFlags(&d.alloc, cudaStreamNonBlocking) == cudaSuccess) {
      d.ready = true;
    }
    cudaGetLastError();
    return d.ready ? &d : nullptr;
  }

  // (mu held) A marker after the work queued so far on `stream`; nullptr if CUDA refuses.
  std::shared_ptr<Marker> mark(cudaStream_t stream, int device) {
    auto m = std::make_shared<Marker>();
    if (cudaSetDevice(device) != cudaSuccess ||
        cudaEventCreateWithFlags(&m->event, cudaEventDisableTiming) != cudaSuccess ||
        cudaEventRecord(m->event, stream) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return m;
  }

  // (mu held) Seals the pending releases of `device` into a batch behind every stream's work.
  void seal(int device, DeviceState& d) {
    if (d.pending.empty()) return;
    Batch b;
    for (const auto& [s, dev] : streams) {
      std::shared_ptr<Marker> m = mark(s, dev);
      if (!m) return;  // keep them pending: never free without the order
      b.markers.push_back(std::move(m));
    }
    b.markers.insert(b.markers.end(), tails.begin(), tails.end());
    b.releases.swap(d.pending);
    d.batches.push_back(std::move(b));
    (void)device;
  }

  // (mu held) Frees the batches of `device` whose work is done; forgets finished tails.
  void collect(int device, DeviceState& d) {
    for (size_t i = 0; i < d.batches.size();) {
      bool done = true;
      for (const auto& m : d.batches[i].markers) done = done && m->complete();
      if (!done) {
        ++i;
        continue;
      }
      cudaSetDevice(device);
      for (const Release& r : d.batches[i].releases) {
        if (r.pinned) {
          reap.emplace_back(r.pointer, device);
          pinned_pending -= 1;
          reaper_wakes.notify_all();
        } else {
          cudaFreeAsync(r.pointer, d.alloc);
        }
      }
      d.batches[i] = std::move(d.batches.back());
      d.batches.pop_back();
    }
    for (size_t i = 0; i < tails.size();) {
      if (tails[i]->complete()) {
        tails[i] = std::move(tails.back());
        tails.pop_back();
      } else {
        ++i;
      }
    }
    cudaGetLastError();
  }
};

// Never destroyed: at process exit CUDA may already be gone.
DeviceMemory& memory() {
  static DeviceMemory* m = new DeviceMemory();
  return *m;
}

// The reaper: while pinned releases are pending it looks every few milliseconds whether their
// work is done (nothing else might ask), and frees what is, outside the lock.
void reap_pinned_memory(DeviceMemory& m) {
  for (;;) {
    std::vector<std::pair<void*, int>> doomed;
    {
      std::unique_lock<std::mutex> l(m.mu);
      m.reaper_wakes.wait_for(l, std::chrono::milliseconds(5), [&] { return !m.reap.empty(); });
      if (m.reap.empty() && m.pinned_pending > 0) {
        for (auto& [device, d] : m.devices)
          if (d.ready) m.collect(device, d);
      }
      if (m.reap.empty() && m.pinned_pending == 0) {
        m.reaper_wakes.wait(l, [&] { return !m.reap.empty() || m.pinned_pending > 0; });
      }
      doomed.swap(m.reap);
    }
    for (const auto& [p, device] : doomed) {
      cudaSetDevice(device);
      cudaFreeHost(p);
    }
  }
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
    m.seal(device, *d);  // what was given back is reused once its last user is done
    m.collect(device, *d);
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

namespace {

// Queues `ptr` for freeing once all work queued so far has completed. Pinned memory is rare and
// large: its batch is sealed at once, behind the work queued now, and the reaper frees it.
void give_back(void* ptr, int device, bool pinned) {
  DeviceMemory& m = memory();
  KeepDevice keep;
  std::lock_guard<std::mutex> l(m.mu);
  DeviceState* d = m.state(device);
  if (d == nullptr) return;  // CUDA is gone: nothing to give back to
  d->pending.push_back({ptr, pinned});
  if (pinned) m.pinned_pending += 1;
  if (pinned || d->pending.size() >= kBatch) m.seal(device, *d);
  m.collect(device, *d);
  if (pinned && !m.reaper_started) {
    m.reaper_started = true;
    std::thread(reap_pinned_memory, std::ref(m)).detach();
  }
  if (pinned) m.reaper_wakes.notify_all();
}

}  // namespace

void release_device_memory(void* ptr, int device) { give_back(ptr, device, false); }

void release_pinned_memory(void* ptr, int device) { give_back(ptr, device, true); }

cudaError_t acquire_stream(int device, cudaStream_t* out) {
  DeviceMemory& m = memory();
  KeepDevice keep;
  std::lock_guard<std::mutex> l(m.mu);
  DeviceState* d = m.state(device);
  if (d == nullptr) return cudaErrorInitializationError;
  // An idle recycled stream first (one whose earlier work is done), else a new one.
  for (size_t i = 0; i < d->idle_streams.size(); ++i) {
    if (cudaStreamQuery(d->idle_streams[i]) == cudaSuccess) {
      *out = d->idle_streams[i];
      d->idle_streams.erase(d->idle_streams.begin() + long(i));
      m.streams.emplace_back(*out, device);
      d->live_streams += 1;
      return cudaSuccess;
    }
  }
  cudaGetLastError();
  cudaError_t rc = cudaSetDevice(device);
  if (rc == cudaSuccess) rc = cudaStreamCreateWithFlags(out, cudaStreamNonBlocking);
  if (rc != cudaSuccess) return rc;
  m.streams.emplace_back(*out, device);
  d->live_streams += 1;
  return cudaSuccess;
}

void return_stream(cudaStream_t stream, int device) {
  DeviceMemory& m = memory();
  KeepDevice keep;
  std::lock_guard<std::mutex> l(m.mu);
  for (size_t i = 0; i < m.streams.size(); ++i) {
    if (m.streams[i].first == stream) {
      m.streams[i] = m.streams.back();
      m.streams.pop_back();
      break;
    }
  }
  // Its queued work stays a dependency of every release until it completes.
  if (std::shared_ptr<Marker> tail = m.mark(stream, device)) m.tails.push_back(std::move(tail));
  DeviceState* d = m.state(device);
  if (d == nullptr) return;
  d->live_streams -= 1;
  d->idle_streams.push_back(stream);
}

int streams_on(int device) {
  DeviceMemory& m = memory();
  std::lock_guard<std::mutex> l(m.mu);
  auto it = m.devices.find(device);
  return 1 + (it == m.devices.end() ? 0 : it->second.live_streams);
}

}  // namespace sy::cuda
