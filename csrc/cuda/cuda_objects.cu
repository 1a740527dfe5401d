// CUDA streams, events, kernel report pools and stream callbacks (cuda_objects.h).
#include "cuda_objects.h"

#include "device_memory.h"

#include <cstring>

namespace sy::cuda {

ReportPool::~ReportPool() {
  cudaSetDevice(device_);
  for (const ReportSlot& r : all_) cudaEventDestroy(r.done);  // legal while a record is pending
  // Kernels of operations nobody waited for may still read and write their reports.
  for (KernelReport* c : chunks_) release_pinned_memory(c, device_);
}

Error ReportPool::take(std::shared_ptr<ReportSlot>* out) {
  ReportSlot slot;
  {
    std::lock_guard<std::mutex> l(mu_);
    size_t pick = free_.size();
    for (size_t i = 0; i < free_.size(); ++i) {
      if (free_[i].complete()) {
        pick = i;
        break;
      }
    }
    if (pick == free_.size()) {
      SY_TRY(grow());
      pick = free_.size() - 1;
    }
    slot = free_[pick];
    free_[pick] = free_.back();
    free_.pop_back();
  }
  std::memset(slot.host, 0, sizeof(KernelReport));
  std::weak_ptr<ReportPool> pool = shared_from_this();
  *out = std::shared_ptr<ReportSlot>(new ReportSlot(slot), [pool](ReportSlot* s) {
    if (auto p = pool.lock()) {
      std::lock_guard<std::mutex> l(p->mu_);
      p->free_.push_back(*s);
    }
    delete s;
  });
  return ok();
}

Error ReportPool::grow() {
  SY_CUDA(cudaSetDevice(device_));
  KernelReport* host = nullptr;
  SY_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&host), kChunk * sizeof(KernelReport), cudaHostAllocMapped));
  chunks_.push_back(host);
  KernelReport* device = nullptr;
  SY_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device), host, 0));
  for (int i = 0; i < kChunk; ++i) {
    ReportSlot r{host + i, device + i, nullptr};
    SY_CUDA(cudaEventCreateWithFlags(&r.done, cudaEventDisableTiming));
    all_.push_back(r);
    free_.push_back(r);
  }
  return ok();
}

Error ReportPool::reserve() {
  std::lock_guard<std::mutex> l(mu_);
  return free_.empty() ? grow() : ok();
}

CudaStream::~CudaStream() {
  if (stream_) return_stream(stream_, rank_->device);  // recycled, never destroyed (device_memory.h)
}

Error CudaStream::init() {
  SY_CUDA(cudaSetDevice(rank_->device));
  SY_CUDA(acquire_stream(rank_->device, &stream_));
  return ok();
}

Error CudaStream::synchronize(Deadline deadline) {
  SY_CUDA(cudaSetDevice(rank_->device));
  return poll([&] { return cudaStreamQuery(stream_); }, deadline, rank, core::WaitRole::Stream, "stream synchronize");
}

Error CudaStream::wait_event(Event& event) {
  auto* ce = dynamic_cast<CudaEvent*>(&event);
  if (ce == nullptr) return fail(SY_ERROR_WRONG_HANDLE, "event: not a CUDA-backend event", "event");
  SY_CUDA(cudaSetDevice(rank_->device));
  SY_CUDA(cudaStreamWaitEvent(stream_, ce->raw(), 0));
  return ok();
}

CudaEvent::~CudaEvent() {
  if (event_) {
    cudaSetDevice(rank_->device);
    cudaEventDestroy(event_);
  }
}

// The events users hold (their own, and operations' with asyncFinish) keep timing, so that
// elapsed_ms can measure an operation by the GPU's clock; the library's ordering events do not.
Error CudaEvent::init(bool timed) {
  timed_ = timed;
  SY_CUDA(cudaSetDevice(rank_->device));
  SY_CUDA(cudaEventCreateWithFlags(&event_, timed ? cudaEventDefault : cudaEventDisableTiming));
  return ok();
}

Error CudaEvent::record(Stream& stream, std::shared_ptr<OpStatus> status) {
  auto* cs = dynamic_cast<CudaStream*>(&stream);
  if (cs == nullptr) return fail(SY_ERROR_WRONG_HANDLE, "stream: not a CUDA-backend stream", "stream");
  SY_CUDA(cudaSetDevice(rank_->device));
  SY_CUDA(cudaEventRecord(event_, cs->raw()));
  std::lock_guard<std::mutex> l(mu_);
  status_ = std::move(status);
  recorded_ = true;
  return ok();
}

Error CudaEvent::query() {
  SY_CUDA(cudaSetDevice(rank_->device));
  cudaError_t rc = cudaEventQuery(event_);
  if (rc == cudaErrorNotReady) return fail(SY_NOT_READY, "event: not complete yet");
  SY_TRY(cuda_error(rc, "event query"));
  return outcome();
}

Error CudaEvent::synchronize(Deadline deadline) {
  SY_CUDA(cudaSetDevice(rank_->device));
  SY_TRY(poll([&] { return cudaEventQuery(event_); }, deadline, rank, core::WaitRole::Event, "event synchronize"));
  return outcome();
}

Error CudaEvent::outcome() {
  std::lock_guard<std::mutex> l(mu_);
  return status_ ? status_->result() : ok();
}

Error CudaEvent::elapsed_ms(Event& end, double* ms) {
  auto* other = dynamic_cast<CudaEvent*>(&end);
  if (other == nullptr) return fail(SY_ERROR_WRONG_HANDLE, "end: not a CUDA-backend event", "end");
  for (CudaEvent* e : {this, other}) {
    std::lock_guard<std::mutex> l(e->mu_);
    const char* which = e == this ? "start" : "end";
    if (!e->recorded_) return invalid(which, std::string(which) + ": never recorded");
    if (!e->timed_) return invalid(which, std::string(which) + ": an event of the library's own, without timing");
  }
  SY_CUDA(cudaSetDevice(rank_->device));
  for (cudaEvent_t e : {event_, other->event_}) {
    const cudaError_t rc = cudaEventQuery(e);
    if (rc == cudaErrorNotReady) return fail(SY_NOT_READY, "event: not complete yet");
    SY_TRY(cuda_error(rc, "event query"));
  }
  float f = 0;
  SY_CUDA(cudaEventElapsedTime(&f, event_, other->event_));
  *ms = double(f);
  return ok();
}

}  // namespace sy::cuda
