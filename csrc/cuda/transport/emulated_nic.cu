// The emulated NIC (emulated_nic.h).
#include "emulated_nic.h"

#include <chrono>

#include "../cuda_check.h"

namespace sy::cuda::transport {

namespace {

// Batches of copies whose completion is tracked by one event each, in order.
constexpr uint64_t kEvents = 64;

}  // namespace

EmulatedFabric::EmulatedFabric(int ranks, int slots, core::LinkModel model)
    : ranks_(ranks), slots_(slots), model_(model), windows_(size_t(ranks)), in_flight_(ranks) {}

void EmulatedFabric::attach(int rank, const Window& w) {
  std::lock_guard<std::mutex> l(mu_);
  windows_[size_t(rank)] = w;
}

bool EmulatedFabric::detach(int rank, int64_t timeout_ms) {
  std::unique_lock<std::mutex> l(mu_);
  windows_[size_t(rank)] = {};
  return in_flight_.wait_none(l, rank, timeout_ms);
}

EmulatedFabric::Window EmulatedFabric::acquire(int rank) {
  std::lock_guard<std::mutex> l(mu_);
  const Window w = windows_[size_t(rank)];
  if (w.base != nullptr) in_flight_.add(rank);
  return w;
}

void EmulatedFabric::release(int rank) {
  std::lock_guard<std::mutex> l(mu_);
  in_flight_.done(rank);
}

Error EmulatedNic::create(EmulatedFabric& fabric, int rank, uint8_t* window, uint64_t window_bytes,
                          cudaStream_t stream, std::unique_ptr<NicEngine>* out) {
  if (rank < 0 || rank >= fabric.ranks()) return invalid("rank", "the proxy's rank is not in the fabric");
  if (window == nullptr || window_bytes == 0) return invalid("window", "a proxy needs its rank's window");
  std::unique_ptr<EmulatedNic> e(new EmulatedNic(fabric, rank));
  e->window_ = window;
  e->window_bytes_ = window_bytes;
  // The highest priority there is: the copies are what kernels on other ranks wait for. (They
  // still share the device's hardware queues with every other stream: a CUDA backend that runs
  // a proxy counts its stream in the co-residency check.)
  if (stream != nullptr) {
    e->stream_ = stream;
  } else {
    int least = 0, greatest = 0;
    SY_CUDA(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    SY_CUDA(cudaStreamCreateWithPriority(&e->stream_, cudaStreamNonBlocking, greatest));
    e->own_stream_ = true;
  }
  e->events_.resize(kEvents, nullptr);
  for (auto& ev : e->events_) SY_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  *out = std::move(e);
  return ok();
}

EmulatedNic::~EmulatedNic() {
  if (stream_) {
    (void)cudaStreamSynchronize(stream_);
    if (own_stream_) (void)cudaStreamDestroy(stream_);
  }
  for (auto ev : events_)
    if (ev) (void)cudaEventDestroy(ev);
}

Error EmulatedNic::start(uint64_t* signals) {
  fabric_.attach(rank_, {window_, window_bytes_, signals});
  attached_ = true;
  return ok();
}

bool EmulatedNic::detach(int64_t timeout_ms) { return !attached_ || fabric_.detach(rank_, timeout_ms); }

Refusal EmulatedNic::accept(NicPut& p, int64_t now_ns) {
  const RdmaDescriptor& d = p.d;
  const bool peer_ok = d.peer >= 0 && d.peer < fabric_.ranks();
  const EmulatedFabric::Window peer = peer_ok ? fabric_.acquire(d.peer) : EmulatedFabric::Window{};
  const Refusal why =
      check_descriptor(d, fabric_.ranks(), fabric_.slots(), window_bytes_, peer.base != nullptr, peer.bytes);
  if (why != Refusal::None) {
    if (peer.base != nullptr) fabric_.release(d.peer);
    return why;
  }
  if (d.op != uint32_t(RdmaOp::Signal)) {
    p.src = window_ + d.src_offset;
    p.dst = peer.base + d.dst_offset;
  } else {
    p.d.bytes = 0;
  }
  if (d.op != uint32_t(RdmaOp::Put)) p.signal = peer.signals + signal_index(rank_, int(d.signal), fabric_.slots());
  p.t = fabric_.model().active() ? link_.send(now_ns, p.d.bytes, fabric_.model()) : core::LinkTimes{now_ns, now_ns, now_ns};
  return Refusal::None;
}

// Starts the copies of the puts whose time to leave has come, as one batch with one event.
NicStep EmulatedNic::issue(NicQueue& q, int64_t now, std::string* error, size_t* failed) {
  if (batches_issued_ - batches_done_ >= kEvents) return NicStep::Idle;
  bool any = false;
  for (size_t i = 0; i < q.size(); ++i) {
    NicPut& f = q[i];
    if (f.issued) continue;
    if (f.t.leaves_ns > now) break;  // puts leave in order
    if (f.d.bytes > 0) {
      const cudaError_t rc = cudaMemcpyAsync(f.dst, f.src, f.d.bytes, cudaMemcpyDefault, stream_);
      if (rc != cudaSuccess) {
        *error = std::string(": ") + cudaGetErrorString(rc);
        *failed = i;
        return NicStep::Failed;  // what went out in this pass has no event: quiesce() waits for the stream
      }
    }
    f.issued = true;
    f.batch = batches_issued_;
    any = true;
  }
  if (!any) return NicStep::Idle;
  const cudaError_t rc = cudaEventRecord(events_[batches_issued_ % kEvents], stream_);
  if (rc != cudaSuccess) {
    *error = std::string(": recording the copies' event: ") + cudaGetErrorString(rc);
    *failed = 0;
    return NicStep::Failed;
  }
  ++batches_issued_;
  return NicStep::Moved;
}

// Copied and, under the link model, arrived.
NicStep EmulatedNic::done(const NicPut& f, int64_t now_ns, std::string* error) {
  while (batches_done_ <= f.batch) {
    const cudaError_t rc = cudaEventQuery(events_[batches_done_ % kEvents]);
    if (rc == cudaErrorNotReady) break;
    if (rc != cudaSuccess) {
      *error = std::string(": ") + cudaGetErrorString(rc);
      return NicStep::Failed;
    }
    ++batches_done_;
  }
  return batches_done_ > f.batch && now_ns >= f.t.arrives_ns ? NicStep::Moved : NicStep::Idle;
}

void EmulatedNic::finish(NicPut& f) {
  if (f.signal) __atomic_fetch_add(f.signal, f.d.signal_add, __ATOMIC_RELEASE);
  fabric_.release(f.d.peer);
}

void EmulatedNic::forget(NicPut& f) { fabric_.release(f.d.peer); }

void EmulatedNic::quiesce() {
  (void)cudaStreamSynchronize(stream_);  // nothing of ours reads or writes memory after this
  batches_done_ = batches_issued_;
}

int64_t EmulatedNic::wake_in_ns(const NicPut& f, int64_t now_ns) const {
  if (!f.issued) return f.t.leaves_ns - now_ns;
  if (batches_done_ > f.batch) return f.t.arrives_ns - now_ns;
  return 2000;
}

}  // namespace sy::cuda::transport
