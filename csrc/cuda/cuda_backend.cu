// The CUDA backend, first part: device discovery, device memory, streams, events, copies and
// the layout kernel. The CUDA runtime is linked statically, so on a machine without a driver
// every call fails cleanly and the backend reports why.
//
// Every host wait polls with a deadline instead of blocking in cudaStreamSynchronize: a kernel
// that never finishes must turn into SY_ERROR_TIMEOUT, not a hung process. FFI calls arrive on
// varying threads, so every entry sets the rank's device first.
#include <chrono>
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

struct CudaRank {
  int device = 0;
  core::InputProblem* problem_host = nullptr;  // mapped pinned memory
  core::InputProblem* problem_device = nullptr;
  ~CudaRank() {
    if (problem_host) cudaFreeHost(problem_host);
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
  std::memset(&p, 0, sizeof p);
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
    SY_TRY(poll([&] { return cudaStreamQuery(stream_); }, deadline, rank, core::WaitRole::Stream,
                "stream synchronize"));
    return problem_to_error(*rank_->problem_host);
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
  Error record(Stream& stream) override {
    auto* cs = dynamic_cast<CudaStream*>(&stream);
    if (cs == nullptr) return fail(SY_ERROR_WRONG_HANDLE, "stream: not a CUDA-backend stream", "stream");
    SY_CUDA(cudaSetDevice(rank_->device));
    SY_CUDA(cudaEventRecord(event_, cs->raw()));
    return ok();
  }
  Error query() override {
    SY_CUDA(cudaSetDevice(rank_->device));
    cudaError_t rc = cudaEventQuery(event_);
    if (rc == cudaErrorNotReady) return fail(SY_NOT_READY, "event: not complete yet");
    SY_TRY(cuda_error(rc, "event query"));
    return problem_to_error(*rank_->problem_host);
  }
  Error synchronize(Deadline deadline) override {
    SY_CUDA(cudaSetDevice(rank_->device));
    SY_TRY(poll([&] { return cudaEventQuery(event_); }, deadline, rank, core::WaitRole::Event,
                "event synchronize"));
    return problem_to_error(*rank_->problem_host);
  }
  cudaEvent_t raw() const { return event_; }

 private:
  CudaRank* rank_;
  cudaEvent_t event_ = nullptr;
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
                                  "backend (backend: \"host\") for dispatch and combine");
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int devices) : devices_(devices) {}
  sy_backend kind() const override { return SY_BACKEND_CUDA; }
  bool dispatch_supported() const override { return false; }

  Error init_rank(GroupCore&, RankCore& rank) override {
    auto st = std::make_shared<CudaRank>();
    st->device = (rank.device + rank.index) % devices_;  // rank.device holds the first device
    rank.device = st->device;
    SY_CUDA(cudaSetDevice(st->device));
    SY_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&st->problem_host), sizeof(core::InputProblem),
                          cudaHostAllocMapped));
    std::memset(st->problem_host, 0, sizeof(core::InputProblem));
    SY_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&st->problem_device), st->problem_host, 0));
    rank.backend_state = st;
    return ok();
  }

  Error allocate(RankCore& rank, uint64_t bytes, std::shared_ptr<Memory>* out) override {
    const int dev = rank_state(rank).device;
    SY_CUDA(cudaSetDevice(dev));
    void* p = nullptr;
    const uint64_t size = core::align_up(bytes == 0 ? 256 : bytes, 256);
    SY_CUDA(cudaMalloc(&p, size));
    cudaError_t rc = cudaMemset(p, 0, size);
    if (rc != cudaSuccess) {
      cudaFree(p);
      return cuda_error(rc, "cudaMemset");
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
    // Virtual ranks of one process address each other's device memory directly.
    return allocate(rank, bytes, out);
  }

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
      return cs.synchronize(deadline);
    }
    std::vector<uint8_t> stage(size_t(span_elements(*t)) * size_t(t->element_size()));
    SY_CUDA(cudaMemcpyAsync(stage.data(), t->data(), stage.size(), cudaMemcpyDeviceToHost, cs.raw()));
    SY_TRY(cs.synchronize(deadline));
    strided_to_dense(*t, stage.data(), static_cast<uint8_t*>(dst));
    return ok();
  }

  Error layout(Stream& comm, std::shared_ptr<LayoutWork> work) override {
    CudaStream& cs = *as_cuda(comm);
    SY_CUDA(cudaSetDevice(cs.rank_state_ref().device));
    return launch_layout(cs.raw(), *work, cs.rank_state_ref().problem_device);
  }

  Error dispatch_notify(BufferCore&, Stream&, std::shared_ptr<DispatchWork>) override {
    return not_yet("dispatch");
  }
  Error dispatch_wait_counts(DispatchWork&, Deadline) override { return not_yet("dispatch"); }
  Error dispatch_epilogue(BufferCore&, Stream&, std::shared_ptr<DispatchWork>) override {
    return not_yet("dispatch");
  }
  Error combine(BufferCore&, Stream&, std::shared_ptr<CombineWork>) override { return not_yet("combine"); }

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
