#include "gin_network.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
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

// Every call Switchyard makes on one communicator, in the order asked for, one at a time, on a
// thread of the communicator's own: NCCL's calls on a communicator must not run concurrently, and
// its collectives must come in the same order on every rank (the order buffers are exported in).
// The thread ends when nothing is queued. A setup that never completed (a rank did not take part)
// leaves the communicator stuck: later GIN setups on it are refused.
class CommQueue {
 public:
  static void post(nccl::Comm comm, std::function<void()> task) {
    std::lock_guard<std::mutex> l(mu());
    Entry& e = entries()[comm];
    e.tasks.push_back(std::move(task));
    if (e.running) return;
    e.running = true;
    std::thread([comm] {
      for (;;) {
        std::function<void()> next;
        {
          std::lock_guard<std::mutex> l(mu());
          Entry& e = entries()[comm];
          if (e.tasks.empty()) {
            e.running = false;
            return;
          }
          next = std::move(e.tasks.front());
          e.tasks.pop_front();
        }
        next();
      }
    }).detach();
  }
  static void mark_stuck(nccl::Comm comm, const std::string& why) {
    std::lock_guard<std::mutex> l(mu());
    Entry& e = entries()[comm];
    if (e.stuck.empty()) e.stuck = why;
  }
  static std::string stuck(nccl::Comm comm) {
    std::lock_guard<std::mutex> l(mu());
    auto it = entries().find(comm);
    return it == entries().end() ? std::string() : it->second.stuck;
  }

 private:
  struct Entry {
    std::deque<std::function<void()>> tasks;
    bool running = false;
    std::string stuck;  // why a setup on it never completed
  };
  static std::mutex& mu() {
    static auto* m = new std::mutex();  // never destroyed: detached threads may outlive statics
    return *m;
  }
  static std::map<nccl::Comm, Entry>& entries() {
    static auto* e = new std::map<nccl::Comm, Entry>();
    return *e;
  }
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

}  // namespace

struct GinNetwork::State {
  GinNetworkOptions o;
  std::shared_ptr<void> keep;  // the group, whose communicator the window and device communicator are on
  std::mutex mu;
  std::condition_variable cv;
  bool ended = false, abandoned = false, released = false;
  Error result;
  void* memory = nullptr;
  ncclWindow_t window = nullptr;
  ncclDevComm dev{};
  bool dev_made = false;

  // Once the setup has ended and nothing uses them: the device communicator, the window, the
  // memory (on the communicator's queue: NCCL's calls on it go one at a time).
  void release_later(const std::shared_ptr<State>& self) {
    if (released) return;
    released = true;
    CommQueue::post(o.comm, [self] {
      const nccl::Library& L = *self->o.lib;
      KeepDevice device_kept;
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
    SY_CUDA(cudaMemset(memory, 0, size_t(o.window_bytes)));
    SY_CUDA(cudaDeviceSynchronize());
    return ok();
  }

  // The collective part, on the communicator's queue. The window is registered last: its
  // registration ends in a barrier of every rank, so no rank's kernels can signal a peer before
  // that peer has zeroed its signals.
  Error setup() {
    const nccl::Library& L = *o.lib;
    KeepDevice device_kept;
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
      refused = fail(SY_ERROR_UNSUPPORTED, "rank " + std::to_string(o.rank) + ": NCCL gave " +
                                               std::to_string(dev.ginContextCount) +
                                               " GIN contexts, the network needs " + std::to_string(o.channels) +
                                               " (two per node); set NCCL_GIN_NCONTEXTS to at least that");
    } else if (dev.ginSignalCount < o.ranks * o.slots || dev.ginCounterCount < o.channels) {
      refused = fail(SY_ERROR_INTERNAL, "rank " + std::to_string(o.rank) + ": NCCL's device communicator has " +
                                            std::to_string(dev.ginSignalCount) + " GIN signals and " +
                                            std::to_string(dev.ginCounterCount) + " counters, fewer than asked for");
    } else {
      gin_reset_kernel<<<1, 256>>>(dev, o.channels, o.ranks * o.slots, o.channels);
      SY_CUDA(cudaGetLastError());
      SY_CUDA(cudaDeviceSynchronize());
    }
    // Registered even when refused: the peers are in the same collective and would wait for it.
    SY_TRY(nccl::call_error(L,
                            L.window_register(o.comm, memory, size_t(o.window_bytes), reinterpret_cast<void**>(&window),
                                              NCCL_WIN_COLL_SYMMETRIC),
                            "ncclCommWindowRegister"));
    return refused;
  }
};

Error GinNetwork::begin(const GinNetworkOptions& o, std::shared_ptr<void> keep, std::shared_ptr<GinNetwork>* out) {
  const std::string who = "rank " + std::to_string(o.rank) + ": SWITCHYARD_NIC=gin: ";
  if (o.lib == nullptr || o.comm == nullptr) {
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
  if (const std::string why = CommQueue::stuck(o.comm); !why.empty()) {
    return fail(SY_ERROR_UNSUPPORTED, who + "an earlier GIN setup on this group never completed (" + why +
                                          "); NCCL's collectives on it are out of step: create a new group");
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
  st->keep = std::move(keep);
  net->state_ = st;
  if (Error e = st->prepare()) {
    st->ended = true;  // nothing collective was begun; the destructor frees the memory
    return e;
  }
  CommQueue::post(o.comm, [st] {
    Error e = st->setup();
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
    CommQueue::mark_stuck(state_->o.comm, what);
    return fail(SY_ERROR_TIMEOUT, what +
                                      ": a rank of the group has not created its buffer, or refused GIN, or NCCL's "
                                      "collective setup is stuck (NCCL_DEBUG=INFO says more)");
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
