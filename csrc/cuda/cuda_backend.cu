// The CUDA backend, first part: device discovery, device memory, streams, events, copies and
// the layout kernel. The CUDA runtime is linked statically, so on a machine without a driver
// every call fails cleanly and the backend reports why.
//
// Every host wait polls with a deadline instead of blocking in cudaStreamSynchronize: a kernel
// that never finishes must turn into SY_ERROR_TIMEOUT, not a hung process. FFI calls arrive on
// varying threads, so every entry sets the rank's device first.
#include <chrono>
#include <mutex>
#include <utility>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../abi/strided.h"
#include "../core/routing.h"
#include "cuda_check.h"
#include "layout_kernel.h"

#ifndef SY_CUDA_ARCHS
#define SY_CUDA_ARCHS ""
#endif

namespace sy {

namespace cuda {
namespace {

// Kernels cannot return errors; they report bad input in a record in mapped host memory. Each
// operation takes its own record from a ring, so one operation's problem is reported by that
// operation's outputs and event, never by unrelated work.
constexpr int kProblemSlots = 256;

struct CudaRank {
  int device = 0;
  core::InputProblem* problems_host = nullptr;  // mapped pinned memory, kProblemSlots records
  core::InputProblem* problems_device = nullptr;
  uint32_t next_problem = 0;
  std::mutex mu;
  ~CudaRank() {
    if (problems_host) cudaFreeHost(problems_host);
  }
  // A cleared record for the next operation: (host view, device view).
  std::pair<core::InputProblem*, core::InputProblem*> take_problem_slot() {
    std::lock_guard<std::mutex> l(mu);
    const uint32_t i = next_problem++ % kProblemSlots;
    std::memset(&problems_host[i], 0, sizeof(core::InputProblem));
    return {&problems_host[i], &problems_device[i]};
  }
};

CudaRank& rank_state(RankCore& r) { return *static_cast<CudaRank*>(r.backend_state.get()); }

Error problem_to_error(core::InputProblem& p) {
  if (__atomic_load_n(&p.flag, __ATOMIC_ACQUIRE) != 1) return ok();
  std::string msg = "topkIdx: token " + std::to_string(p.token) + ", entry " + std::to_string(p.entry);
  if (core::TopkProblem(p.kind) == core::TopkProblem::Duplicate) {
    msg += " repeats expert " + std::to_string(p.value) + " (a token visits an expert once)";
  } else {
    msg += " holds expert " + std::to_string(p.value) + ", outside the expert range (-1 marks an unused entry)";
  }
  return invalid("topkIdx", msg);
}

// Polls `query` until it stops answering cudaErrorNotReady or the deadline passes.
template <class Query>
Error poll(Query query, Deadline deadline, int rank, core::WaitRole role, const char* what) {
  double start = now_seconds();
  double nap = 2e-6;
  for (;;) {
    cudaError_t rc = query();
    if (rc == cudaSuccess) return ok();
    if (rc != cudaErrorNotReady) return cuda_error(rc, what);
    if (deadline.expired()) {
      core::WaitFailure w;
      w.rank = rank;
      w.role = role;
      w.waited_seconds = now_seconds() - start;
      return timeout_error(w, what);
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(nap));
    nap = nap < 1e-3 ? nap * 2 : 1e-3;
  }
}

class CudaEvent;

class CudaStream final : public Stream {
 public:
  CudaStream(std::shared_ptr<GroupCore> g, RankCore& r) : Stream(std::move(g), r.index), rank_(&rank_state(r)) {}
  ~CudaStream() override {
    if (stream_) {
      cudaSetDevice(rank_->device);
      cudaStreamDestroy(stream_);
    }
  }
  Error init() {
    SY_CUDA(cudaSetDevice(rank_->device));
    SY_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    return ok();
  }
  Error wait_event(Event& event) override;
  Error synchronize(Deadline deadline) override {
    SY_CUDA(cudaSetDevice(rank_->device));
    return poll([&] { return cudaStreamQuery(stream_); }, deadline, rank, core::WaitRole::Stream,
                "stream synchronize");
  }
  cudaStream_t raw() const { return stream_; }
  CudaRank& rank_state_ref() const { return *rank_; }

 private:
  CudaRank* rank_;
  cudaStream_t stream_ = nullptr;
};

class CudaEvent final : public Event {
 public:
  CudaEvent(std::shared_ptr<GroupCore> g, RankCore& r) : Event(std::move(g), r.index), rank_(&rank_state(r)) {}
  ~CudaEvent() override {
    if (event_) {
      cudaSetDevice(rank_->device);
      cudaEventDestroy(event_);
    }
  }
  Error init() {
    SY_CUDA(cudaSetDevice(rank_->device));
    SY_CUDA(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    return ok();
  }
  Error record(Stream& stream, std::shared_ptr<OpStatus> status) override {
    auto* cs = dynamic_cast<CudaStream*>(&stream);
    if (cs == nullptr) return fail(SY_ERROR_WRONG_HANDLE, "stream: not a CUDA-backend stream", "stream");
    SY_CUDA(cudaSetDevice(rank_->device));
    SY_CUDA(cudaEventRecord(event_, cs->raw()));
    std::lock_guard<std::mutex> l(mu_);
    status_ = std::move(status);
    return ok();
  }
  Error query() override {
    SY_CUDA(cudaSetDevice(rank_->device));
    cudaError_t rc = cudaEventQuery(event_);
    if (rc == cudaErrorNotReady) return fail(SY_NOT_READY, "event: not complete yet");
    SY_TRY(cuda_error(rc, "event query"));
    return outcome();
  }
  Error synchronize(Deadline deadline) override {
    SY_CUDA(cudaSetDevice(rank_->device));
    SY_TRY(poll([&] { return cudaEventQuery(event_); }, deadline, rank, core::WaitRole::Event,
                "event synchronize"));
    return outcome();
  }
  cudaEvent_t raw() const { return event_; }

 private:
  // Called once the event completed: the recorded operation's failure, if any.
  Error outcome() {
    std::lock_guard<std::mutex> l(mu_);
    return status_ ? status_->result() : ok();
  }
  CudaRank* rank_;
  cudaEvent_t event_ = nullptr;
  std::mutex mu_;
  std::shared_ptr<OpStatus> status_;
};

Error CudaStream::wait_event(Event& event) {
  auto* ce = dynamic_cast<CudaEvent*>(&event);
  if (ce == nullptr) return fail(SY_ERROR_WRONG_HANDLE, "event: not a CUDA-backend event", "event");
  SY_CUDA(cudaSetDevice(rank_->device));
  SY_CUDA(cudaStreamWaitEvent(stream_, ce->raw(), 0));
  return ok();
}

CudaStream* as_cuda(Stream& s) { return dynamic_cast<CudaStream*>(&s); }

Error not_yet(const char* what) {
  return fail(SY_ERROR_UNSUPPORTED,
              std::string(what) + " is not implemented on the CUDA backend yet; use the host "
                                  "backend (backend: \"host\") for it");
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int devices) : devices_(devices) {}
  sy_backend kind() const override { return SY_BACKEND_CUDA; }
  bool dispatch_supported() const override { return false; }

  Error init_rank(GroupCore& group, RankCore& rank) override {
    auto st = std::make_shared<CudaRank>();
    // Virtual ranks spread from the first device (rank.device); a process uses its own device.
    st->device = group.process_group ? rank.device % devices_ : (rank.device + rank.index) % devices_;
    rank.device = st->device;
    SY_CUDA(cudaSetDevice(st->device));
    SY_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&st->problems_host), kProblemSlots * sizeof(core::InputProblem),
                          cudaHostAllocMapped));
    std::memset(st->problems_host, 0, kProblemSlots * sizeof(core::InputProblem));
    SY_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&st->problems_device), st->problems_host, 0));
    rank.backend_state = st;
    return ok();
  }

  Error allocate(RankCore& rank, uint64_t bytes, std::shared_ptr<Memory>* out) override {
    const int dev = rank_state(rank).device;
    SY_CUDA(cudaSetDevice(dev));
    void* p = nullptr;
    const uint64_t size = core::align_up(bytes == 0 ? 256 : bytes, 256);
    SY_CUDA(cudaMalloc(&p, size));
    // The library's streams do not wait for the legacy default stream: the fill must be done
    // before any of them can touch the memory.
    cudaError_t rc = cudaMemsetAsync(p, 0, size, 0);
    if (rc == cudaSuccess) rc = cudaStreamSynchronize(0);
    if (rc != cudaSuccess) {
      cudaFree(p);
      return cuda_error(rc, "zero-filling new device memory");
    }
    auto m = std::make_shared<Memory>();
    m->ptr = p;
    m->bytes = size;
    m->device = dev;
    m->release = [dev](void* q) {
      cudaSetDevice(dev);
      cudaFree(q);
    };
    *out = std::move(m);
    return ok();
  }

  Error allocate_shared(RankCore& rank, uint64_t bytes, std::shared_ptr<Memory>* out) override {
    // Virtual ranks of one process address each other's device memory directly; other
    // processes open it through a CUDA IPC handle.
    SY_TRY(allocate(rank, bytes, out));
    if (!rank.group->process_group) return ok();
    cudaIpcMemHandle_t h;
    SY_CUDA(cudaIpcGetMemHandle(&h, (*out)->ptr));
    static const char* hex = "0123456789abcdef";
    std::string name = "cuda-ipc:";
    for (size_t i = 0; i < sizeof h.reserved; ++i) {
      const auto b = static_cast<uint8_t>(h.reserved[i]);
      name += hex[b >> 4];
      name += hex[b & 15];
    }
    (*out)->share_name = name;
    return ok();
  }

  Error import_shared(RankCore& rank, const std::string& name, uint64_t bytes, std::shared_ptr<Memory>* out) override {
    cudaIpcMemHandle_t h;
    const std::string prefix = "cuda-ipc:";
    if (name.rfind(prefix, 0) != 0 || name.size() != prefix.size() + 2 * sizeof h.reserved) {
      return invalid("share", "share: '" + name.substr(0, 40) + "' is not a CUDA IPC handle");
    }
    auto nibble = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
    for (size_t i = 0; i < sizeof h.reserved; ++i) {
      h.reserved[i] = char(nibble(name[prefix.size() + 2 * i]) << 4 | nibble(name[prefix.size() + 2 * i + 1]));
    }
    const int dev = rank_state(rank).device;
    SY_CUDA(cudaSetDevice(dev));
    void* p = nullptr;
    SY_CUDA(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
    auto m = std::make_shared<Memory>();
    m->ptr = p;
    m->bytes = bytes;
    m->device = dev;
    m->release = [dev](void* q) {
      cudaSetDevice(dev);
      cudaIpcCloseMemHandle(q);
    };
    *out = std::move(m);
    return ok();
  }

  Error seal_shared(Memory&) override { return ok(); }  // IPC handles have no name to drop

  Error bind_thread(RankCore& rank) override {
    SY_CUDA(cudaSetDevice(rank_state(rank).device));
    return ok();
  }

  Error nccl_usable() const override { return ok(); }

  Error create_stream(std::shared_ptr<GroupCore> g, RankCore& rank, std::shared_ptr<Stream>* out) override {
    auto s = std::make_shared<CudaStream>(std::move(g), rank);
    SY_TRY(s->init());
    *out = std::move(s);
    return ok();
  }

  Error create_event(std::shared_ptr<GroupCore> g, RankCore& rank, std::shared_ptr<Event>* out) override {
    auto e = std::make_shared<CudaEvent>(std::move(g), rank);
    SY_TRY(e->init());
    *out = std::move(e);
    return ok();
  }

  Error write_tensor(Stream& s, std::shared_ptr<Tensor> t, const void* src, Deadline deadline) override {
    CudaStream& cs = *as_cuda(s);
    SY_CUDA(cudaSetDevice(cs.rank_state_ref().device));
    if (t->is_dense()) {
      SY_CUDA(cudaMemcpyAsync(t->data(), src, t->dense_bytes(), cudaMemcpyHostToDevice, cs.raw()));
      return cs.synchronize(deadline);
    }
    // Strided: bring the span over, scatter on the host, send it back.
    std::vector<uint8_t> stage(size_t(span_elements(*t)) * size_t(t->element_size()));
    SY_CUDA(cudaMemcpyAsync(stage.data(), t->data(), stage.size(), cudaMemcpyDeviceToHost, cs.raw()));
    SY_TRY(cs.synchronize(deadline));
    dense_to_strided(*t, static_cast<const uint8_t*>(src), stage.data());
    SY_CUDA(cudaMemcpyAsync(t->data(), stage.data(), stage.size(), cudaMemcpyHostToDevice, cs.raw()));
    return cs.synchronize(deadline);
  }

  Error read_tensor(Stream& s, std::shared_ptr<Tensor> t, void* dst, Deadline deadline) override {
    CudaStream& cs = *as_cuda(s);
    SY_CUDA(cudaSetDevice(cs.rank_state_ref().device));
    if (t->is_dense()) {
      SY_CUDA(cudaMemcpyAsync(dst, t->data(), t->dense_bytes(), cudaMemcpyDeviceToHost, cs.raw()));
      SY_TRY(cs.synchronize(deadline));
    } else {
      std::vector<uint8_t> stage(size_t(span_elements(*t)) * size_t(t->element_size()));
      SY_CUDA(cudaMemcpyAsync(stage.data(), t->data(), stage.size(), cudaMemcpyDeviceToHost, cs.raw()));
      SY_TRY(cs.synchronize(deadline));
      strided_to_dense(*t, stage.data(), static_cast<uint8_t*>(dst));
    }
    // The operation that filled the tensor completed before the copy: did it fail?
    return t->producer ? t->producer->result() : ok();
  }

  Error layout(Stream& comm, std::shared_ptr<LayoutWork> work) override {
    CudaStream& cs = *as_cuda(comm);
    SY_CUDA(cudaSetDevice(cs.rank_state_ref().device));
    std::pair<core::InputProblem*, core::InputProblem*> slot = cs.rank_state_ref().take_problem_slot();
    core::InputProblem* host = slot.first;
    work->status->check_after = [host]() { return problem_to_error(*host); };
    return launch_layout(cs.raw(), *work, slot.second);
  }

  Error dispatch_notify(BufferCore&, Stream&, std::shared_ptr<DispatchWork>) override {
    return not_yet("dispatch");
  }
  Error dispatch_wait_counts(DispatchWork&, Deadline) override { return not_yet("dispatch"); }
  Error dispatch_epilogue(BufferCore&, Stream&, std::shared_ptr<DispatchWork>) override {
    return not_yet("dispatch");
  }
  Error combine(BufferCore&, Stream&, std::shared_ptr<CombineWork>) override { return not_yet("combine"); }
  Error ll_dispatch_send(BufferCore&, Stream&, std::shared_ptr<LLWork>) override {
    return not_yet("low-latency dispatch");
  }
  Error ll_dispatch_recv(BufferCore&, Stream&, std::shared_ptr<LLWork>) override {
    return not_yet("low-latency dispatch");
  }
  Error ll_combine_send(BufferCore&, Stream&, std::shared_ptr<LLWork>) override {
    return not_yet("low-latency combine");
  }
  Error ll_combine_recv(BufferCore&, Stream&, std::shared_ptr<LLWork>) override {
    return not_yet("low-latency combine");
  }
  Error ll_clean(BufferCore&, Stream&, uint32_t, std::shared_ptr<OpStatus>) override {
    return not_yet("cleanLowLatencyBuffer");
  }

 private:
  int devices_;
};

}  // namespace
}  // namespace cuda

Error probe_cuda(sy_backend_info* info) {
  info->compiled = 1;
  std::strncpy(info->compiled_archs, SY_CUDA_ARCHS, sizeof info->compiled_archs - 1);
  int v = 0;
  if (cudaRuntimeGetVersion(&v) == cudaSuccess) info->cuda_runtime_version = v;
  v = 0;
  if (cudaDriverGetVersion(&v) == cudaSuccess) info->cuda_driver_version = v;
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess || count == 0) {
    info->available = 0;
    std::string why = rc != cudaSuccess ? std::string("no CUDA device: ") + cudaGetErrorString(rc)
                                        : std::string("no CUDA device found");
    std::strncpy(info->reason, why.c_str(), sizeof info->reason - 1);
    cudaGetLastError();  // clear the runtime's sticky last error
    return ok();
  }
  info->available = 1;
  info->device_count = count;
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
    std::string name = std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
    std::strncpy(info->device_name, name.c_str(), sizeof info->device_name - 1);
  }
  info->dispatch_supported = 0;
  return ok();
}

Error cuda_peer_access(int a, int b, int* can_access, int* native_atomics) {
  int count = 0;
  SY_CUDA(cudaGetDeviceCount(&count));
  if (a < 0 || a >= count || b < 0 || b >= count) {
    return invalid("device", "device: " + std::to_string(a) + " and " + std::to_string(b) + " must be below the " +
                                 std::to_string(count) + " devices present");
  }
  SY_CUDA(cudaDeviceCanAccessPeer(can_access, a, b));
  *native_atomics = 0;
  if (*can_access) SY_CUDA(cudaDeviceGetP2PAttribute(native_atomics, cudaDevP2PAttrNativeAtomicSupported, a, b));
  return ok();
}

std::unique_ptr<Backend> make_cuda_backend(Error* why) {
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess || count == 0) {
    *why = fail(SY_ERROR_NO_DEVICE,
                std::string("backend: no CUDA device (") +
                    (rc != cudaSuccess ? cudaGetErrorString(rc) : "the driver reports 0 devices") +
                    "); use backend \"host\"",
                "backend");
    cudaGetLastError();
    return nullptr;
  }
  return std::make_unique<cuda::CudaBackend>(count);
}

}  // namespace sy
