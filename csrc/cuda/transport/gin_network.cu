#include "gin_network.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "../cuda_check.h"
#include "../device_memory.h"

#if SY_NCCL_GIN
#include <nccl.h>
#include <nccl_device.h>
#endif

namespace sy::cuda::transport {

#if SY_NCCL_GIN

namespace {

std::string version_text(int code) {
  // NCCL_VERSION_CODE: major * 10000 + minor * 100 + patch since 2.9.
  return std::to_string(code / 10000) + "." + std::to_string(code / 100 % 100) + "." + std::to_string(code % 100);
}

// What the transport keeps per communicator (GinNetworkOptions::comm_state): every call it makes
// on the communicator, in the order asked for, one at a time, on a thread of its own: NCCL's calls
// on a communicator must not overlap, and its collectives must come in the same order on every
// rank (the order buffers are exported in). The thread ends when nothing is queued. A setup that
// failed or never completed leaves the ranks' collectives out of step (`stuck` says how): later
// GIN setups on the communicator are refused.
class CommState : public std::enable_shared_from_this<CommState> {
 public:
  void post(std::function<void()> task) {
    std::lock_guard<std::mutex> l(mu_);
    tasks_.push_back(std::move(task));
    if (running_) return;
    try {
      std::thread([self = shared_from_this()] { self->run(); }).detach();
      running_ = true;
    } catch (const std::exception&) {
      // No thread now: the tasks wait for the next post to start one.
    }
  }
  void mark_stuck(const std::string& why) {
    std::lock_guard<std::mutex> l(mu_);
    if (stuck_.empty()) stuck_ = why;
  }
  // A setup that completed: the ranks' collectives are in step again (one that ran late was
  // marked stuck by its waiter).
  void clear_stuck() {
    std::lock_guard<std::mutex> l(mu_);
    stuck_.clear();
  }
  std::string stuck() {
    std::lock_guard<std::mutex> l(mu_);
    return stuck_;
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> next;
      {
        std::lock_guard<std::mutex> l(mu_);
        if (tasks_.empty()) {
          running_ = false;
          return;
        }
        next = std::move(tasks_.front());
        tasks_.pop_front();
      }
      next();
    }
  }

  std::mutex mu_;
  std::deque<std::function<void()>> tasks_;
  bool running_ = false;
  std::string stuck_;
};

// Zeroes the device communicator's signals and counters in every context: NCCL allocates their ids
// from a pool a destroyed device communicator of the same communicator may have used, and the
// rings count from zero.
__global__ void gin_reset_kernel(ncclDevComm dev, int contexts, int signals, int counters) {
  for (int c = 0; c < contexts; ++c) {
    ncclGin gin(dev, c);
    for (int i = int(threadIdx.x); i < signals; i += int(blockDim.x)) gin.resetSignal(ncclGinSignal_t(i));
    for (int i = int(threadIdx.x); i < counters; i += int(blockDim.x)) gin.resetCounter(ncclGinCounter_t(i));
  }
}

// Runs `work` on a stream of its own (never behind the application's work on the legacy stream)
// and waits for it.
template <class Work>
Error on_private_stream(Work work) {
  cudaStream_t s = nullptr;
  SY_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaError_t rc = work(s);
  if (rc == cudaSuccess) rc = cudaStreamSynchronize(s);
  cudaStreamDestroy(s);
  return cuda_error(rc, "the GIN window's setup");
}

}  // namespace

struct GinNetwork::State {
  GinNetworkOptions o;
  std::shared_ptr<CommState> comm;
  std::shared_ptr<void> keep;  // the group, whose communicator the window and device communicator are on
  std::string who;             // "rank r: SWITCHYARD_NIC=gin: "
  std::mutex mu;
  std::condition_variable cv;
  bool ended = false, abandoned = false, released = false;
  Error result;
  void* memory = nullptr;
  ncclWindow_t window = nullptr;
  ncclDevComm dev{};
  bool dev_made = false;

  // Once the setup has ended and nothing of this rank uses them: the device communicator, the
  // window, the memory (on the communicator's queue: NCCL's calls on it go one at a time; its
  // thread is the queue's own, so its current device needs no keeping).
  void release_later(const std::shared_ptr<State>& self) {
    if (released) return;
    released = true;
    comm->post([self] {
      const nccl::Library& L = *self->o.lib;
      cudaSetDevice(self->o.device);
      if (self->dev_made) L.dev_comm_destroy(self->o.comm, &self->dev);
      if (self->window != nullptr) L.window_deregister(self->o.comm, self->window);
      if (self->memory != nullptr) L.mem_free(self->memory);
      self->keep.reset();
    });
  }

  // What each rank does alone, before any collective: its window's memory, zeroed.
  Error prepare() {
    const nccl::Library& L = *o.lib;
    KeepDevice device_kept;
    SY_CUDA(cudaSetDevice(o.device));
    SY_TRY(nccl::call_error(L, L.mem_alloc(&memory, size_t(o.window_bytes)), "ncclMemAlloc (the GIN window)"));
    return on_private_stream([&](cudaStream_t s) { return cudaMemsetAsync(memory, 0, size_t(o.window_bytes), s); });
  }

  // The collective part, on the communicator's queue. The window is registered last, whatever
  // came before (the peers are in the same collectives): its registration ends in a barrier of
  // every rank, so no rank's kernels can signal a peer before that peer has zeroed its signals.
  Error setup() {
    const nccl::Library& L = *o.lib;
    SY_CUDA(cudaSetDevice(o.device));
    ncclDevCommRequirements_t reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
    reqs.ginConnectionType = NCCL_GIN_CONNECTION_FULL;
    reqs.ginContextCount = o.channels;
    reqs.ginSignalCount = o.ranks * o.slots;
    reqs.ginCounterCount = o.channels;
    SY_TRY(nccl::call_error(L, L.dev_comm_create(o.comm, &reqs, &dev), "ncclDevCommCreate"));
    dev_made = true;
    // The context count asked for is a hint NCCL may cap (NCCL_GIN_NCONTEXTS, a pool shared with
    // earlier device communicators): a channel without a context of its own would share ordering.
    Error refused;
    if (int(dev.ginContextCount) < o.channels) {
      refused = fail(SY_ERROR_UNSUPPORTED, "NCCL gave " + std::to_string(dev.ginContextCount) +
                                               " GIN contexts, the network needs " + std::to_string(o.channels) +
                                               " (two per node); set NCCL_GIN_NCONTEXTS to at least that");
    } else if (dev.ginSignalCount < o.ranks * o.slots || dev.ginCounterCount < o.channels) {
      refused = fail(SY_ERROR_INTERNAL, "NCCL's device communicator has " + std::to_string(dev.ginSignalCount) +
                                            " GIN signals and " + std::to_string(dev.ginCounterCount) +
                                            " counters, fewer than asked for");
    } else {
      refused = on_private_stream([&](cudaStream_t s) {
        gin_reset_kernel<<<1, 256, 0, s>>>(dev, o.channels, o.ranks * o.slots, o.channels);
        return cudaGetLastError();
      });
    }
    SY_TRY(nccl::call_error(L,
                            L.window_register(o.comm, memory, size_t(o.window_bytes), reinterpret_cast<void**>(&window),
                                              NCCL_WIN_COLL_SYMMETRIC),
                            "ncclCommWindowRegister"));
    return refused;
  }
};

Error GinNetwork::begin(const GinNetworkOptions& o, std::shared_ptr<void> keep, std::shared_ptr<GinNetwork>* out) {
  const std::string who = "rank " + std::to_string(o.rank) + ": SWITCHYARD_NIC=gin: ";
  if (o.lib == nullptr || o.comm == nullptr || o.comm_state == nullptr) {
    return fail(SY_ERROR_UNSUPPORTED, who + "the group has no NCCL communicator (group.nccl says why)");
  }
  const nccl::Library& L = *o.lib;
  if (!L.device_api) {
    return fail(SY_ERROR_UNSUPPORTED, who + "NCCL " + version_text(L.version) + " at " + L.path +
                                          " has no device API (NCCL 2.29.7 or newer has)");
  }
  // Before 2.31 a GIN device communicator needs the library of exactly the headers' version; from
  // 2.31 on a newer library takes older headers' (NCCL's notes say so; not tried here).
  const bool same_needed = NCCL_VERSION_CODE < 23100;
  if (same_needed ? L.version != NCCL_VERSION_CODE : L.version < NCCL_VERSION_CODE) {
    return fail(SY_ERROR_UNSUPPORTED,
                who + "the GIN kernels were compiled against NCCL " + version_text(NCCL_VERSION_CODE) + " headers, " +
                    L.path + " is NCCL " + version_text(L.version) +
                    (same_needed ? " (before NCCL 2.31 GIN needs the same version)" : " (older)") +
                    "; build with SWITCHYARD_NCCL_ROOT at that NCCL's prefix");
  }
  if (o.channels <= 0 || o.slots <= 0 || o.slots > kGinMaxSlots || int(o.slot_context.size()) != o.slots ||
      o.window_bytes == 0) {
    return fail(SY_ERROR_INTERNAL, who + "channels, slots or window out of range");
  }
  for (int32_t c : o.slot_context)
    if (c < 0 || c >= o.channels) return fail(SY_ERROR_INTERNAL, who + "a slot's context is not a channel");
  if (!*o.comm_state) *o.comm_state = std::make_shared<CommState>();
  const std::shared_ptr<CommState> comm = std::static_pointer_cast<CommState>(*o.comm_state);
  if (const std::string why = comm->stuck(); !why.empty()) {
    return fail(SY_ERROR_UNSUPPORTED, who + "an earlier GIN setup on this group did not complete (" + why +
                                          "): NCCL's collectives on it are out of step; create a new group");
  }
  ncclCommProperties_t props = NCCL_COMM_PROPERTIES_INITIALIZER;
  SY_TRY(nccl::call_error(L, L.query_properties(o.comm, &props), "ncclCommQueryProperties"));
  if (!props.deviceApiSupport) {
    return fail(SY_ERROR_UNSUPPORTED, who + "NCCL's device API is off on this communicator (it needs cuMem memory, "
                                            "NCCL_WIN_ENABLE=1, peer access between the GPUs of a node, and GIN "
                                            "across nodes)");
  }
  if (props.ginType == NCCL_GIN_TYPE_NONE) {
    return fail(SY_ERROR_UNSUPPORTED,
                who + "NCCL found no GIN backend (it needs a ConnectX NIC and GPU memory registration: "
                      "nvidia-peermem or dma-buf, which `doctor` checks; and NCCL_GIN_ENABLE not 0); "
                      "SWITCHYARD_NIC=ibverbs needs the same NIC but no GIN");
  }
  auto net = std::shared_ptr<GinNetwork>(new GinNetwork());
  auto st = std::make_shared<State>();
  st->o = o;
  st->o.comm_state = nullptr;  // the caller's, valid only during this call
  st->comm = comm;
  st->keep = std::move(keep);
  st->who = who;
  net->state_ = st;
  if (Error e = st->prepare()) {
    // This rank enters none of the collectives its peers are entering: they are out of step now.
    comm->mark_stuck("rank " + std::to_string(o.rank) + " could not make its window");
    st->ended = true;  // the destructor frees what was made
    e.message = who + e.message + "; the group's GIN is unusable now: create a new group";
    return e;
  }
  comm->post([st] {
    Error e = st->setup();
    if (e) {
      st->comm->mark_stuck("rank " + std::to_string(st->o.rank) + ": " + e.message);
      e.message = st->who + e.message + " (NCCL_DEBUG=WARN says more); the group's GIN is unusable now: create a new group";
    } else {
      st->comm->clear_stuck();
    }
    std::lock_guard<std::mutex> l(st->mu);
    st->result = std::move(e);
    st->ended = true;
    if (st->abandoned) st->release_later(st);
    st->cv.notify_all();
  });
  *out = std::move(net);
  return ok();
}

GinNetwork::~GinNetwork() {
  if (!state_) return;
  std::lock_guard<std::mutex> l(state_->mu);
  state_->abandoned = true;
  if (state_->ended) state_->release_later(state_);  // else the setup does, when it ends
}

Error GinNetwork::wait_ready(const Deadline& deadline) const {
  std::unique_lock<std::mutex> l(state_->mu);
  const double left = deadline.remaining_seconds();
  const bool ended = state_->cv.wait_for(l, std::chrono::duration<double>(left > 0 ? left : 0),
                                         [&] { return state_->ended; });
  if (!ended) {
    const std::string what = "rank " + std::to_string(state_->o.rank) +
                             ": NCCL GIN's device communicator and window were not ready after " +
                             std::to_string(int64_t(deadline.ms_total)) + " ms";
    state_->comm->mark_stuck(what);
    return fail(SY_ERROR_TIMEOUT, what +
                                      ": a rank of the group has not created its buffer, or refused GIN, or NCCL's "
                                      "collective setup is stuck (NCCL_DEBUG=INFO says more); the group's GIN is "
                                      "unusable now: create a new group");
  }
  return state_->result;
}

uint8_t* GinNetwork::window() const { return static_cast<uint8_t*>(state_->memory); }

Error GinNetwork::fill_channels(NetChannel* out, int count, uint64_t* posted, uint64_t timeout_ns) const {
  const State& s = *state_;
  if (!s.ended || !s.result.ok() || count != s.o.channels) {
    return fail(SY_ERROR_INTERNAL, "GIN channels asked for before the setup succeeded");
  }
  for (int c = 0; c < count; ++c) {
    NetChannel ch{};
    ch.on_gin = 1;
    GinChannel& g = ch.gin;
    g.comm = s.dev;
    g.window = s.window;
    g.origin = s.o.origin;
    g.window_bytes = s.o.window_bytes;
    g.context = c;
    g.slots = s.o.slots;
    for (int i = 0; i < s.o.slots; ++i) g.slot_context[i] = s.o.slot_context[size_t(i)];
    g.counter = ncclGinCounter_t(c);
    g.posted = posted + c;
    g.timeout_ns = timeout_ns;
    out[c] = ch;
  }
  return ok();
}

#else  // a build without NCCL's headers

struct GinNetwork::State {};

Error GinNetwork::begin(const GinNetworkOptions& o, std::shared_ptr<void>, std::shared_ptr<GinNetwork>*) {
  return fail(SY_ERROR_UNSUPPORTED, "rank " + std::to_string(o.rank) +
                                        ": SWITCHYARD_NIC=gin: this library was built without NCCL's device API "
                                        "(SWITCHYARD_NCCL_ROOT at an NCCL 2.29.7 or newer when it is built, on a "
                                        "CUDA build); SWITCHYARD_NIC=ibverbs needs no NCCL");
}

GinNetwork::~GinNetwork() = default;

Error GinNetwork::wait_ready(const Deadline&) const { return fail(SY_ERROR_UNSUPPORTED, "no NCCL GIN in this build"); }

uint8_t* GinNetwork::window() const { return nullptr; }

Error GinNetwork::fill_channels(NetChannel*, int, uint64_t*, uint64_t) const {
  return fail(SY_ERROR_UNSUPPORTED, "no NCCL GIN in this build");
}

#endif

}  // namespace sy::cuda::transport
