// The CPU proxy (proxy.h).
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

Error Proxy::create(const ProxyOptions& o, std::unique_ptr<NicEngine> engine, std::unique_ptr<Proxy>* out) {
  if (!engine) return invalid("engine", "a proxy needs a NIC engine");
  if (o.rank < 0 || o.rank >= engine->ranks()) return invalid("rank", "the proxy's rank is not in the fabric");
  if (o.channels < 1 || o.entries < 1) return invalid("channels", "a proxy needs a channel of at least one entry");
  std::unique_ptr<Proxy> p(new Proxy(o));
  p->engine_ = std::move(engine);
  if (p->o_.counters == nullptr) p->o_.counters = &p->own_counters_;
  SY_CUDA(cudaSetDevice(o.device));
  const size_t ring_bytes = sizeof(RdmaDescriptor) * size_t(o.entries) * size_t(o.channels);
  const size_t control_bytes = sizeof(ProxyControl) * size_t(o.channels);
  const size_t signal_bytes = sizeof(uint64_t) * size_t(p->engine_->ranks()) * size_t(p->engine_->slots());
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
  p->taken_.assign(size_t(o.channels), 0);
  p->started_ = true;  // from here on the engine may have let peers in: detach() before freeing
  SY_TRY(p->engine_->start(p->signals_));
  p->thread_ = std::thread([raw = p.get()] { raw->run(); });
  *out = std::move(p);
  return ok();
}

Proxy::~Proxy() {
  // First the puts into this rank's memory by its peers (refused from now on; what an engine
  // cannot wait for: emulated_nic.h, verbs_engine.h), then its own: their sources are its
  // window, which the caller frees next.
  const bool drained = !started_ || engine_->detach(30000);
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  engine_.reset();
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
  ch.ranks = engine_->ranks();
  ch.slots = engine_->slots();
  ch.timeout_ns = timeout_ns;
  return ch;
}

uint64_t Proxy::signal(int source, int slot) const {
  return load_acquire(signals_[signal_index(source, slot, engine_->slots())]);
}

Error Proxy::refusal() const {
  std::lock_guard<std::mutex> l(refusal_->mu);
  if (refusal_->text.empty()) return ok();
  return fail(SY_ERROR_INTERNAL, refusal_->text);  // a kernel posted it: a bug of ours, not of the input
}

std::function<std::string()> Proxy::refusal_reader() const {
  return [r = refusal_] {
    std::lock_guard<std::mutex> l(r->mu);
    return r->text;
  };
}

Error Proxy::reset(int64_t timeout_ms) {
  std::unique_lock<std::mutex> l(mu_);
  const uint64_t mine = ++resets_requested_;
  if (!cv_.wait_for(l, std::chrono::milliseconds(timeout_ms), [&] { return resets_done_ >= mine; })) {
    return fail(SY_ERROR_TIMEOUT, "rank " + std::to_string(o_.rank) + ": the proxy did not finish the puts in " +
                                      "flight within " + std::to_string(timeout_ms) + " ms of the reset");
  }
  l.unlock();
  std::lock_guard<std::mutex> t(refusal_->mu);
  if (!refusal_->text.empty()) return fail(SY_ERROR_CUDA, refusal_->text);  // the drain met an engine's failure
  return ok();
}

void Proxy::refuse(int channel, uint64_t index, Refusal why, const std::string& detail) {
  const bool device_error_before = device_error_;
  if (why == Refusal::Device) device_error_ = true;
  // The first refusal is the one reported, but for the NIC's failure after a refusal of another
  // kind (a credit to a rank whose window is gone, which the kernels' waits let pass): the proxy
  // then takes in no more signals, and the kernels must not wait on.
  if (refused_ && (why != Refusal::Device || device_error_before)) return;
  const std::string text = channel < 0 ? "rank " + std::to_string(o_.rank) + ": the proxy stopped: " +
                                             refusal_text(why) + detail
                                       : "rank " + std::to_string(o_.rank) + ", channel " + std::to_string(channel) +
                                             ", descriptor " + std::to_string(index) + ": the proxy refused it: " +
                                             refusal_text(why) + detail;
  {
    std::lock_guard<std::mutex> l(refusal_->mu);
    refusal_->text = refused_ ? refusal_->text + "; then " + text : text;
  }
  refused_ = true;
  for (int c = 0; c < o_.channels; ++c) {
    ProxyControl& ctl = controls_[c];
    store_release(ctl.refused_channel, channel < 0 ? kNoChannel : uint32_t(channel));
    store_release(ctl.refused_index, channel < 0 ? 0 : index);
    store_release(ctl.refused, uint32_t(why));
  }
}

void Proxy::drop(NicQueue& q) {
  for (NicPut& f : q) engine_->forget(f);
  q.clear();
}

// Takes every complete descriptor the rings hold, in each channel's order; the engine checks each.
Refusal Proxy::signal_channel_refusal(const NicPut& f) const {
  if (o_.signal_channels.empty() || f.d.op == uint32_t(RdmaOp::Put)) return Refusal::None;
  if (f.d.peer < 0 || f.d.signal >= uint32_t(o_.signal_slots)) return Refusal::None;  // the engine's checks refuse it
  const size_t at = size_t(f.d.peer) * size_t(o_.signal_slots) + f.d.signal;
  if (at >= o_.signal_channels.size()) return Refusal::None;
  return o_.signal_channels[at] == f.channel ? Refusal::None : Refusal::SignalChannel;
}

bool Proxy::take(NicQueue& q) {
  if (refused_) return false;
  bool moved = false;
  const int64_t now = now_ns();
  for (int c = 0; c < o_.channels && !refused_; ++c) {
    RdmaDescriptor* ring = rings_ + size_t(c) * o_.entries;
    while (q.size() < kMaxInFlight) {
      const uint64_t index = taken_[size_t(c)];
      RdmaDescriptor& slot = ring[ring_slot(index, o_.entries)];
      if (load_acquire(slot.seq) != index + 1) break;
      NicPut f;
      f.channel = c;
      f.index = index;
      std::memcpy(&f.d, &slot, sizeof(RdmaDescriptor));
      Refusal why = signal_channel_refusal(f);
      if (why == Refusal::None) why = engine_->accept(f, now);
      if (why != Refusal::None) {
        refuse(c, index, why,
               " (peer " + std::to_string(f.d.peer) + ", source offset " + std::to_string(f.d.src_offset) +
                   ", destination offset " + std::to_string(f.d.dst_offset) + ", " + std::to_string(f.d.bytes) +
                   " bytes, slot " + std::to_string(f.d.signal) + ")");
        return true;
      }
      q.push_back(f);
      taken_[size_t(c)] = index + 1;
      moved = true;
    }
  }
  return moved;
}

bool Proxy::issue(NicQueue& q) {
  if (device_error_ || q.empty()) return false;
  std::string error;
  size_t failed = 0;
  const NicStep step = engine_->issue(q, now_ns(), &error, &failed);
  if (step == NicStep::Failed) {
    const NicPut& at = q[std::min(failed, q.size() - 1)];
    refuse(at.channel, at.index, Refusal::Device, error);
  }
  return step != NicStep::Idle;
}

// Completes puts in order, then counts what crossed and advances the channel's consumed count
// (the kernel may reuse the source and the ring slot).
bool Proxy::complete(NicQueue& q) {
  if (device_error_) return false;  // whether the puts ran is unknown: nothing completes
  bool moved = false;
  const int64_t now = now_ns();
  while (!q.empty()) {
    NicPut& f = q.front();
    if (!f.issued) break;
    std::string error;
    const NicStep step = engine_->done(f, now, &error);
    if (step == NicStep::Failed) {
      refuse(f.channel, f.index, Refusal::Device, error);
      return true;
    }
    if (step == NicStep::Idle) break;
    if (f.d.op != uint32_t(RdmaOp::Signal)) {
      // A put with a signal carries as many entries as it raises the signal by (the two hops'
      // records and combine entries: a dispatch puts several records at once); a bare put one.
      const uint64_t entries = f.d.op == uint32_t(RdmaOp::PutSignal) ? f.d.signal_add : 1;
      o_.counters->records.fetch_add(entries, std::memory_order_relaxed);
      o_.counters->puts.fetch_add(1, std::memory_order_relaxed);
      o_.counters->bytes.fetch_add(f.d.bytes, std::memory_order_relaxed);
    }
    engine_->finish(f);
    store_release(controls_[f.channel].consumed, f.index + 1);
    q.pop_front();
    moved = true;
  }
  return moved;
}

bool Proxy::progress() {
  if (device_error_) return false;
  std::string error;
  const NicStep step = engine_->progress(&error);
  if (step == NicStep::Failed) refuse(-1, 0, Refusal::Device, error);
  return step != NicStep::Idle;
}

// A reset: the puts it accepted finish (after an engine's failure: the engine quiesces and they
// are dropped, their completion unknown), then every channel starts afresh after what its kernel
// posted.
void Proxy::restart(NicQueue& q) {
  while (!q.empty() && !device_error_ && !stop_.load(std::memory_order_relaxed)) {
    const bool moved = progress();
    if (!issue(q) && !complete(q) && !moved) {
      std::this_thread::sleep_for(std::chrono::nanoseconds(std::clamp<int64_t>(next_wake_ns(q), 1000, 1000000)));
    }
  }
  const bool device_error = device_error_;
  if (device_error) engine_->quiesce();
  drop(q);
  for (int c = 0; c < o_.channels; ++c) {
    ProxyControl& ctl = controls_[c];
    const uint64_t posted = load_acquire(ctl.posted);
    taken_[size_t(c)] = posted;
    store_release(ctl.consumed, posted);
    store_release(ctl.refused_index, uint64_t(0));
    store_release(ctl.refused_channel, uint32_t(0));
    store_release(ctl.refused, uint32_t(0));
  }
  refused_ = false;
  device_error_ = false;
  std::lock_guard<std::mutex> l(refusal_->mu);
  if (!device_error) refusal_->text.clear();  // kept for reset() to report
}

// Nanoseconds until the queue's front can move (its time to leave, or to arrive once sent).
int64_t Proxy::next_wake_ns(const NicQueue& q) const {
  if (q.empty()) return 50000;
  return engine_->wake_in_ns(q.front(), now_ns());
}

void Proxy::run() {
  (void)cudaSetDevice(o_.device);
  NicQueue q;
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
    bool moved = progress();
    moved = take(q) || moved;
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
  // Stopping (the destructor): what the engine already started finishes there; the rest never goes.
  if (!device_error_) {
    const int64_t give_up = now_ns() + 30'000'000'000;
    while (!q.empty() && q.front().issued && !device_error_ && now_ns() < give_up) {
      (void)progress();
      if (!complete(q)) std::this_thread::sleep_for(std::chrono::microseconds(10));
    }
  }
  if (device_error_ || !q.empty()) engine_->quiesce();
  drop(q);
}

}  // namespace sy::cuda::transport
