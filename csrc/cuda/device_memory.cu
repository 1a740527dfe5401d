#include "device_memory.h"

#include <algorithm>
#include <chrono>
#include <functional>
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
// How long a zero fill of new memory may take before the allocation fails (cudaErrorTimeout).
constexpr std::chrono::seconds kZeroFillDeadline(20);

// A marker event, destroyed with its last holder.
struct Marker {
  cudaEvent_t event = nullptr;
  ~Marker() {
    if (event) cudaEventDestroy(event);
  }
  bool complete() const { return cudaEventQuery(event) != cudaErrorNotReady; }
};

// Memory given back: device memory from the pool, pinned host memory, or a peer's memory mapped
// through a CUDA IPC handle; or an action to run, as the reaper frees pinned memory.
enum class Released : uint8_t { Device, Pinned, IpcMapping, Action };
struct Release {
  void* pointer;
  Released kind;
  std::shared_ptr<std::function<void()>> action;
};

// Releases to carry out once every marker has completed.
struct Batch {
  std::vector<Release> releases;
  std::vector<std::shared_ptr<Marker>> markers;
};

// A stream the library created, with the hardware queue it was given (device_memory.h).
struct QueuedStream {
  cudaStream_t stream;
  int queue;
};

struct DeviceState {
  bool ready = false;
  cudaStream_t alloc = nullptr;  // allocations, their zero fill, and the frees
  int alloc_queue = 0;
  std::vector<Release> pending;  // released, batch not sealed yet
  std::vector<Batch> batches;    // sealed, waiting for their markers
  std::vector<QueuedStream> idle_streams;
  std::vector<QueuedStream> live;  // handed out, not given back
  int created = 0;                 // streams created on the device (the legacy one aside)
  cudaStream_t nic = nullptr;      // the emulated NIC's copies (acquire_nic_stream), kept for good
};

struct DeviceMemory {
  std::mutex mu;  // a leaf: nothing else is locked, and no Memory is destroyed, under it
  int queues = 8;  // CUDA's default until set_hardware_queues says otherwise
  std::string queue_source = "the driver's default";
  std::vector<std::pair<cudaStream_t, int>> streams;  // live library streams
  std::vector<std::shared_ptr<Marker>> tails;         // the last work of returned streams
  std::map<int, DeviceState> devices;
  // Pinned memory whose work is done, freed by the reaper: cudaFreeHost may wait for the whole
  // device, which no thread that enqueues work may do (device_memory.h).
  std::vector<std::pair<Release, int>> reap;
  int pinned_pending = 0;  // pinned and IPC releases not yet handed to the reaper
  std::condition_variable reaper_wakes;
  bool reaper_started = false;

  // (mu held) The device's state, set up on first use; nullptr if CUDA refuses.
  DeviceState* state(int device) {
    DeviceState& d = devices[device];
    if (d.ready) return &d;
    if (cudaSetDevice(device) == cudaSuccess && cudaStreamCreateWithFlags(&d.alloc, cudaStreamNonBlocking) == cudaSuccess) {
      d.ready = true;
      d.alloc_queue = next_queue(d);
    }
    cudaGetLastError();
    return d.ready ? &d : nullptr;
  }

  // (mu held) The queue the next stream created on the device gets: round-robin after the
  // legacy default stream's queue 0.
  int next_queue(DeviceState& d) {
    d.created += 1;
    return d.created % queues;
  }

  // (mu held) Whether a live stream of the device (or the legacy one) holds `queue`.
  bool queue_taken(const DeviceState& d, int queue) const {
    if (queue == 0 || (d.ready && queue == d.alloc_queue)) return true;
    for (const QueuedStream& s : d.live)
      if (s.queue == queue) return true;
    return false;
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
        if (r.kind != Released::Device) {
          reap.emplace_back(r, device);
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
    std::vector<std::pair<Release, int>> doomed;
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
    for (const auto& [r, device] : doomed) {
      cudaSetDevice(device);
      if (r.kind == Released::Pinned) {
        cudaFreeHost(r.pointer);
      } else if (r.kind == Released::Action) {
        (*r.action)();
      } else {
        cudaIpcCloseMemHandle(r.pointer);
      }
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
  // Polled, with a deadline: the stream holds only zero fills and frees, but if it ever shared a
  // hardware queue with a kernel that waits for this thread, a blocking wait would never return.
  const auto deadline = std::chrono::steady_clock::now() + kZeroFillDeadline;
  for (auto nap = std::chrono::microseconds(2); rc == cudaSuccess;) {
    rc = cudaStreamQuery(s);
    if (rc != cudaErrorNotReady) break;
    rc = std::chrono::steady_clock::now() < deadline ? cudaSuccess : cudaErrorTimeout;
    std::this_thread::sleep_for(nap);
    nap = std::min(nap * 2, std::chrono::microseconds(1000));
  }
  if (rc != cudaSuccess) {
    cudaFreeAsync(*out, s);
    *out = nullptr;
  }
  return rc;
}

namespace {

// Queues `ptr` for freeing once all work queued so far has completed. Pinned memory and IPC
// mappings are rare and large: their batch is sealed at once, behind the work queued now, and the
// reaper frees them (a peer's kernel may still write into a mapping when its buffer is destroyed,
// as an abandoning rank's does: closing it at once would pull the memory from under the kernel).
void give_back(void* ptr, int device, Released kind, std::shared_ptr<std::function<void()>> action = nullptr) {
  const bool pinned = kind != Released::Device;
  DeviceMemory& m = memory();
  KeepDevice keep;
  std::lock_guard<std::mutex> l(m.mu);
  DeviceState* d = m.state(device);
  if (d == nullptr) return;  // CUDA is gone: nothing to give back to
  d->pending.push_back({ptr, kind, std::move(action)});
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

void release_device_memory(void* ptr, int device) { give_back(ptr, device, Released::Device); }

void release_pinned_memory(void* ptr, int device) { give_back(ptr, device, Released::Pinned); }

void release_ipc_mapping(void* ptr, int device) { give_back(ptr, device, Released::IpcMapping); }

cudaError_t acquire_nic_stream(int device, cudaStream_t* out) {
  DeviceMemory& m = memory();
  {
    std::lock_guard<std::mutex> l(m.mu);
    DeviceState* d = m.state(device);
    if (d == nullptr) return cudaErrorInitializationError;
    if (d->nic) {
      *out = d->nic;
      return cudaSuccess;
    }
  }
  cudaStream_t s = nullptr;
  const cudaError_t rc = acquire_stream(device, &s);
  if (rc != cudaSuccess) return rc;
  bool first = false;
  {
    std::lock_guard<std::mutex> l(m.mu);
    DeviceState* d = m.state(device);
    first = d->nic == nullptr;
    if (first) d->nic = s;
    *out = d->nic;
  }
  if (!first) return_stream(s, device);  // another thread made one first
  return cudaSuccess;
}

void run_when_done(std::function<void()> action, int device) {
  give_back(nullptr, device, Released::Action, std::make_shared<std::function<void()>>(std::move(action)));
}

cudaError_t acquire_stream(int device, cudaStream_t* out) {
  DeviceMemory& m = memory();
  KeepDevice keep;
  std::lock_guard<std::mutex> l(m.mu);
  DeviceState* d = m.state(device);
  if (d == nullptr) return cudaErrorInitializationError;
  auto hand_out = [&](QueuedStream s) {
    *out = s.stream;
    m.streams.emplace_back(s.stream, device);
    d->live.push_back(s);
    return cudaSuccess;
  };
  // An idle recycled stream (one whose earlier work is done) on a queue no live stream holds;
  // else a new stream, if it gets a queue of its own; else an idle one or a new one anyway
  // (queue_sharing then says so, and operations that could deadlock refuse to start).
  auto idle = [&](bool free_queue_only) -> int {
    for (size_t i = 0; i < d->idle_streams.size(); ++i) {
      if (free_queue_only && m.queue_taken(*d, d->idle_streams[i].queue)) continue;
      if (cudaStreamQuery(d->idle_streams[i].stream) == cudaSuccess) return int(i);
    }
    return -1;
  };
  int i = idle(true);
  if (i < 0 && d->created + 1 >= m.queues) i = idle(false);
  cudaGetLastError();
  if (i >= 0) {
    const QueuedStream s = d->idle_streams[size_t(i)];
    d->idle_streams.erase(d->idle_streams.begin() + i);
    return hand_out(s);
  }
  cudaError_t rc = cudaSetDevice(device);
  cudaStream_t created = nullptr;
  if (rc == cudaSuccess) rc = cudaStreamCreateWithFlags(&created, cudaStreamNonBlocking);
  if (rc != cudaSuccess) return rc;
  return hand_out({created, m.next_queue(*d)});
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
  for (size_t i = 0; i < d->live.size(); ++i) {
    if (d->live[i].stream != stream) continue;
    d->idle_streams.push_back(d->live[i]);
    d->live.erase(d->live.begin() + long(i));
    return;
  }
}

void set_hardware_queues(int queues, const std::string& source) {
  DeviceMemory& m = memory();
  std::lock_guard<std::mutex> l(m.mu);
  m.queues = queues < 1 ? 1 : queues;
  m.queue_source = source;
}

QueueSharing queue_sharing(int device) {
  DeviceMemory& m = memory();
  std::lock_guard<std::mutex> l(m.mu);
  QueueSharing q;
  q.queues = m.queues;
  q.source = m.queue_source;
  std::vector<int> holders(size_t(m.queues), 0);
  holders[0] = 1;  // the legacy default stream
  q.streams = 1;
  auto it = m.devices.find(device);
  if (it != m.devices.end() && it->second.ready) {
    holders[size_t(it->second.alloc_queue)] += 1;
    q.streams += 1;
    for (const QueuedStream& s : it->second.live) {
      holders[size_t(s.queue)] += 1;
      q.streams += 1;
    }
  }
  for (int h : holders) q.shared = q.shared || h > 1;
  return q;
}

}  // namespace sy::cuda
