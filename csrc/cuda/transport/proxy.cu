// The CPU proxy and the emulated NIC (proxy.h).
#include "proxy.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "../cuda_check.h"

namespace sy::cuda::transport {

namespace {

// Puts taken and not yet complete, per rank: beyond this the proxy lets the rings fill (the
// kernels then wait for room).
constexpr size_t kMaxInFlight = 4096;
// Batches of copies whose completion is tracked by one event each, in order.
constexpr uint64_t kEvents = 64;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The words shared with kernels in host-mapped memory (nvcc compiles host code as C++17: no
// std::atomic_ref).
template <class T>
T load_acquire(const T& v) {
  return __atomic_load_n(&v, __ATOMIC_ACQUIRE);
}
template <class T>
void store_release(T& v, T x) {
  __atomic_store_n(&v, x, __ATOMIC_RELEASE);
}

}  // namespace

EmulatedFabric::EmulatedFabric(int ranks, int slots, core::LinkModel model, core::NetworkCounters* counters)
    : ranks_(ranks),
      slots_(slots),
      model_(model),
      windows_(size_t(ranks)),
      in_flight_(size_t(ranks), 0),
      own_counters_(counters ? nullptr : new Counters[size_t(ranks)]),
      counters_(counters ? counters : own_counters_.get()) {}

void EmulatedFabric::attach(int rank, const Window& w) {
  std::lock_guard<std::mutex> l(mu_);
  windows_[size_t(rank)] = w;
}

bool EmulatedFabric::detach(int rank, int64_t timeout_ms) {
  std::unique_lock<std::mutex> l(mu_);
  windows_[size_t(rank)] = {};
  return cv_.wait_for(l, std::chrono::milliseconds(timeout_ms), [&] { return in_flight_[size_t(rank)] == 0; });
}

EmulatedFabric::Window EmulatedFabric::acquire(int rank) {
  std::lock_guard<std::mutex> l(mu_);
  const Window w = windows_[size_t(rank)];
  if (w.base != nullptr) ++in_flight_[size_t(rank)];
  return w;
}

void EmulatedFabric::release(int rank) {
  std::lock_guard<std::mutex> l(mu_);
  if (--in_flight_[size_t(rank)] == 0) cv_.notify_all();
}

struct Proxy::InFlight {
  int channel = 0;
  uint64_t index = 0;
  RdmaDescriptor d{};
  uint8_t* dst = nullptr;
  const uint8_t* src = nullptr;
  uint64_t* signal = nullptr;  // the peer's counter for me, host-mapped
  core::LinkTimes t;
  bool issued = false;
  uint64_t batch = 0;  // the batch of copies it went out with
};

Proxy::Proxy(const ProxyOptions& o, EmulatedFabric& fabric) : o_(o), fabric_(fabric) {}

Error Proxy::create(const ProxyOptions& o, EmulatedFabric& fabric, uint8_t* window, uint64_t window_bytes,
                    std::unique_ptr<Proxy>* out) {
  if (o.rank < 0 || o.rank >= fabric.ranks()) return invalid("rank", "the proxy's rank is not in the fabric");
  if (o.channels < 1 || o.entries < 1) return invalid("channels", "a proxy needs a channel of at least one entry");
  if (window == nullptr || window_bytes == 0) return invalid("window", "a proxy needs its rank's window");
  std::unique_ptr<Proxy> p(new Proxy(o, fabric));
  p->window_ = window;
  p->window_bytes_ = window_bytes;
  SY_CUDA(cudaSetDevice(o.device));
  const size_t ring_bytes = sizeof(RdmaDescriptor) * size_t(o.entries) * size_t(o.channels);
  const size_t control_bytes = sizeof(ProxyControl) * size_t(o.channels);
  const size_t signal_bytes = sizeof(uint64_t) * size_t(fabric.ranks()) * size_t(fabric.slots());
  const unsigned flags = cudaHostAllocMapped | cudaHostAllocPortable;
  SY_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&p->rings_), ring_bytes, flags));
  SY_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&p->controls_), control_bytes, flags));
  if (o.signals != nullptr) {
    // Zero already, and written only by the peers' puts of an operation, none of which can come
    // before this rank's kernels run: not cleared here.
    SY_CUDA(cudaHostRegister(o.signals, signal_bytes, cudaHostRegisterMapped | cudaHostRegisterPortable));
    p->signals_ = o.signals;
    p->signals_registered_ = true;
  } else {
    SY_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&p->signals_), signal_bytes, flags));
    std::memset(p->signals_, 0, signal_bytes);
  }
  std::memset(p->rings_, 0, ring_bytes);
  std::memset(p->controls_, 0, control_bytes);
  SY_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&p->d_rings_), p->rings_, 0));
  SY_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&p->d_controls_), p->controls_, 0));
  SY_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&p->d_signals_), p->signals_, 0));
  // The highest priority there is: the copies are what kernels on other ranks wait for. (They
  // still share the device's hardware queues with every other stream: a CUDA backend that runs
  // a proxy counts its stream in the co-residency check.)
  if (o.stream != nullptr) {
    p->stream_ = o.stream;
  } else {
    int least = 0, greatest = 0;
    SY_CUDA(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    SY_CUDA(cudaStreamCreateWithPriority(&p->stream_, cudaStreamNonBlocking, greatest));
    p->own_stream_ = true;
  }
  p->events_.resize(kEvents, nullptr);
  for (auto& e : p->events_) SY_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  p->taken_.assign(size_t(o.channels), 0);
  fabric.attach(o.rank, {window, window_bytes, p->signals_});
  p->attached_ = true;
  p->thread_ = std::thread([raw = p.get()] { raw->run(); });
  *out = std::move(p);
  return ok();
}

Proxy::~Proxy() {
  // First the puts into this rank's memory by the proxies of this process (refused from now on;
  // other processes' proxies are not waited for, proxy.h), then its own: their sources are its
  // window, which the caller frees next.
  const bool drained = !attached_ || fabric_.detach(o_.rank, 30000);
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  if (stream_) {
    (void)cudaStreamSynchronize(stream_);
    if (own_stream_) (void)cudaStreamDestroy(stream_);
  }
  for (auto e : events_)
    if (e) (void)cudaEventDestroy(e);
  if (rings_) (void)cudaFreeHost(rings_);
  if (controls_) (void)cudaFreeHost(controls_);
  if (signals_registered_) {
    (void)cudaHostUnregister(signals_);  // the owner's mapping stays until it frees it
  } else if (!drained) {
    // A peer's put may still raise a signal here: its array is leaked rather than freed under it.
    std::fprintf(stderr, "switchyard: rank %d: peers' puts still in flight to it after 30 s; its signals stay\n",
                 o_.rank);
  } else if (signals_) {
    (void)cudaFreeHost(signals_);
  }
}

ProxyChannel Proxy::channel(int c, uint64_t timeout_ns) const {
  ProxyChannel ch;
  ch.ring = d_rings_ + size_t(c) * o_.entries;
  ch.control = d_controls_ + c;
  ch.signals = d_signals_;
  ch.entries = o_.entries;
  ch.channel = c;
  ch.rank = o_.rank;
  ch.ranks = fabric_.ranks();
  ch.slots = fabric_.slots();
  ch.timeout_ns = timeout_ns;
  return ch;
}

uint64_t Proxy::signal(int source, int slot) const {
  return load_acquire(signals_[signal_index(source, slot, fabric_.slots())]);
}

Error Proxy::refusal() const {
  std::lock_guard<std::mutex> l(mu_);
  if (refusal_.empty()) return ok();
  return fail(SY_ERROR_INTERNAL, refusal_);  // a kernel posted it: a bug of ours, not of the input
}

Error Proxy::reset(int64_t timeout_ms) {
  std::unique_lock<std::mutex> l(mu_);
  const uint64_t mine = ++resets_requested_;
  if (!cv_.wait_for(l, std::chrono::milliseconds(timeout_ms), [&] { return resets_done_ >= mine; })) {
    return fail(SY_ERROR_TIMEOUT, "rank " + std::to_string(o_.rank) + ": the proxy did not finish the puts in " +
                                      "flight within " + std::to_string(timeout_ms) + " ms of the reset");
  }
  if (!refusal_.empty()) return fail(SY_ERROR_CUDA, refusal_);  // the drain met a CUDA error
  return ok();
}

void Proxy::refuse(int channel, uint64_t index, Refusal why, const std::string& detail) {
  if (why == Refusal::Device) device_error_ = true;
  if (refused_) return;  // the first refusal is the one reported
  {
    std::lock_guard<std::mutex> l(mu_);
    refusal_ = "rank " + std::to_string(o_.rank) + ", channel " + std::to_string(channel) + ", descriptor " +
               std::to_string(index) + ": the proxy refused it: " + refusal_text(why) + detail;
  }
  refused_ = true;
  for (int c = 0; c < o_.channels; ++c) {
    ProxyControl& ctl = controls_[c];
    store_release(ctl.refused_index, c == channel ? index : taken_[size_t(c)]);
    store_release(ctl.refused, uint32_t(why));
  }
}

void Proxy::drop(Queue& q) {
  for (const InFlight& f : q) fabric_.release(f.d.peer);
  q.clear();
}

// Takes every complete descriptor the rings hold, in each channel's order; checks each.
bool Proxy::take(Queue& q) {
  if (refused_) return false;
  bool moved = false;
  const int64_t now = now_ns();
  for (int c = 0; c < o_.channels && !refused_; ++c) {
    RdmaDescriptor* ring = rings_ + size_t(c) * o_.entries;
    while (q.size() < kMaxInFlight) {
      const uint64_t index = taken_[size_t(c)];
      RdmaDescriptor& slot = ring[ring_slot(index, o_.entries)];
      if (load_acquire(slot.seq) != index + 1) break;
      InFlight f;
      f.channel = c;
      f.index = index;
      std::memcpy(&f.d, &slot, sizeof(RdmaDescriptor));
      const bool peer_ok = f.d.peer >= 0 && f.d.peer < fabric_.ranks();
      const EmulatedFabric::Window peer = peer_ok ? fabric_.acquire(f.d.peer) : EmulatedFabric::Window{};
      const Refusal why = check_descriptor(f.d, fabric_.ranks(), fabric_.slots(), window_bytes_,
                                           peer.base != nullptr, peer.bytes);
      if (why != Refusal::None) {
        if (peer.base != nullptr) fabric_.release(f.d.peer);
        refuse(c, index, why,
               " (peer " + std::to_string(f.d.peer) + ", source offset " + std::to_string(f.d.src_offset) +
                   ", destination offset " + std::to_string(f.d.dst_offset) + ", " + std::to_string(f.d.bytes) +
                   " bytes, slot " + std::to_string(f.d.signal) + ")");
        return true;
      }
      if (f.d.op != uint32_t(RdmaOp::Signal)) {
        f.src = window_ + f.d.src_offset;
        f.dst = peer.base + f.d.dst_offset;
      } else {
        f.d.bytes = 0;
      }
      if (f.d.op != uint32_t(RdmaOp::Put)) f.signal = peer.signals + signal_index(o_.rank, int(f.d.signal), fabric_.slots());
      f.t = fabric_.model().active() ? link_.send(now, f.d.bytes, fabric_.model()) : core::LinkTimes{now, now, now};
      q.push_back(f);
      taken_[size_t(c)] = index + 1;
      moved = true;
    }
  }
  return moved;
}

// Starts the copies of the puts whose time to leave has come, as one batch with one event.
bool Proxy::issue(Queue& q) {
  if (device_error_ || batches_issued_ - batches_done_ >= kEvents) return false;
  const int64_t now = now_ns();
  bool any = false;
  for (InFlight& f : q) {
    if (f.issued) continue;
    if (f.t.leaves_ns > now) break;  // puts leave in order
    if (f.d.bytes > 0) {
      const cudaError_t rc = cudaMemcpyAsync(f.dst, f.src, f.d.bytes, cudaMemcpyDefault, stream_);
      if (rc != cudaSuccess) {
        refuse(f.channel, f.index, Refusal::Device, std::string(": ") + cudaGetErrorString(rc));
        return true;  // what went out in this pass has no event: restart() waits for the stream
      }
    }
    f.issued = true;
    f.batch = batches_issued_;
    any = true;
  }
  if (!any) return false;
  const cudaError_t rc = cudaEventRecord(events_[batches_issued_ % kEvents], stream_);
  if (rc != cudaSuccess) {
    refuse(q.front().channel, q.front().index, Refusal::Device,
           std::string(": recording the copies' event: ") + cudaGetErrorString(rc));
    return true;
  }
  ++batches_issued_;
  return true;
}

// Completes puts in order: copied and, under the link model, arrived. Then the signal, then the
// channel's consumed count (the kernel may reuse the source and the ring slot).
bool Proxy::complete(Queue& q) {
  if (device_error_) return false;  // whether the copies ran is unknown: nothing completes
  bool moved = false;
  const int64_t now = now_ns();
  while (!q.empty()) {
    InFlight& f = q.front();
    if (!f.issued) break;
    while (batches_done_ <= f.batch) {
      const cudaError_t rc = cudaEventQuery(events_[batches_done_ % kEvents]);
      if (rc == cudaErrorNotReady) break;
      if (rc != cudaSuccess) {
        refuse(f.channel, f.index, Refusal::Device, std::string(": ") + cudaGetErrorString(rc));
        return true;
      }
      ++batches_done_;
    }
    if (batches_done_ <= f.batch || now < f.t.arrives_ns) break;
    EmulatedFabric::Counters& carried = fabric_.carried_by(o_.rank);
    if (f.d.op != uint32_t(RdmaOp::Signal)) {
      // A put with a signal carries as many entries as it raises the signal by (the two hops'
      // records and combine entries: a dispatch puts several records at once); a bare put one.
      const uint64_t entries = f.d.op == uint32_t(RdmaOp::PutSignal) ? f.d.signal_add : 1;
      carried.records.fetch_add(entries, std::memory_order_relaxed);
      carried.puts.fetch_add(1, std::memory_order_relaxed);
      carried.bytes.fetch_add(f.d.bytes, std::memory_order_relaxed);
    }
    if (f.signal) __atomic_fetch_add(f.signal, f.d.signal_add, __ATOMIC_RELEASE);
    store_release(controls_[f.channel].consumed, f.index + 1);
    fabric_.release(f.d.peer);
    q.pop_front();
    moved = true;
  }
  return moved;
}

// A reset: the puts it accepted finish (after a CUDA error: its stream is waited for and they
// are dropped, their completion unknown), then every channel starts afresh after what its
// kernel posted.
void Proxy::restart(Queue& q) {
  while (!q.empty() && !device_error_ && !stop_.load(std::memory_order_relaxed)) {
    if (!issue(q) && !complete(q)) {
      std::this_thread::sleep_for(std::chrono::nanoseconds(std::clamp<int64_t>(next_wake_ns(q), 1000, 1000000)));
    }
  }
  const bool device_error = device_error_;
  if (device_error) {
    (void)cudaStreamSynchronize(stream_);  // nothing of ours reads or writes memory after this
    batches_done_ = batches_issued_;
  }
  drop(q);
  for (int c = 0; c < o_.channels; ++c) {
    ProxyControl& ctl = controls_[c];
    const uint64_t posted = load_acquire(ctl.posted);
    taken_[size_t(c)] = posted;
    store_release(ctl.consumed, posted);
    store_release(ctl.refused_index, uint64_t(0));
    store_release(ctl.refused, uint32_t(0));
  }
  refused_ = false;
  device_error_ = false;
  std::lock_guard<std::mutex> l(mu_);
  if (!device_error) refusal_.clear();  // kept for reset() to report
}

// Nanoseconds until the queue's front can move: its time to leave, or to arrive once copied
// (a copy still running: soon).
int64_t Proxy::next_wake_ns(const Queue& q) const {
  if (q.empty()) return 50000;
  const InFlight& f = q.front();
  const int64_t now = now_ns();
  if (!f.issued) return f.t.leaves_ns - now;
  if (batches_done_ > f.batch) return f.t.arrives_ns - now;
  return 2000;
}

void Proxy::run() {
  (void)cudaSetDevice(o_.device);
  Queue q;
  uint32_t idle = 0;
  while (!stop_.load(std::memory_order_relaxed)) {
    {
      std::unique_lock<std::mutex> l(mu_);
      if (resets_done_ < resets_requested_) {
        const uint64_t target = resets_requested_;
        l.unlock();
        restart(q);
        l.lock();
        resets_done_ = target;
        cv_.notify_all();
      }
    }
    bool moved = take(q);
    moved = issue(q) || moved;
    moved = complete(q) || moved;
    if (moved) {
      idle = 0;
      continue;
    }
    // Idle: poll eagerly for a while (a kernel posting a burst), then sleep until the front put
    // can move (its time to leave or arrive under the link model), 50 us at most. With nothing in
    // flight the naps grow to 1 ms: a buffer's proxy outlives its last operation until the work
    // queued before its release is done, and idle proxies must not take the cores from the
    // kernels that work (the first put after a quiet spell waits that much longer).
    if (idle < 64) {
      ++idle;
      std::this_thread::yield();
      continue;
    }
    idle = std::min<uint32_t>(idle + 1, 64 + 50);  // 20 us more per quiet nap, up to 1 ms
    const int64_t quiet_ns = int64_t(idle - 64) * 20000;
    const int64_t nap = q.empty() ? quiet_ns : std::clamp<int64_t>(next_wake_ns(q), 0, 50000);
    std::this_thread::sleep_for(std::chrono::nanoseconds(nap));
  }
  // Stopping (the destructor): the copies already issued finish there; the rest never go.
  if (!device_error_) {
    while (!q.empty() && q.front().issued) {
      (void)cudaStreamSynchronize(stream_);
      if (!complete(q)) break;
    }
  }
  drop(q);
}

}  // namespace sy::cuda::transport
