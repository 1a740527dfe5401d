// The CUDA backend's runtime objects: per-rank state (device, kernel reports), streams and
// events whose every host wait polls with a deadline instead of blocking in
// cudaStreamSynchronize: a kernel that never finishes must turn into SY_ERROR_TIMEOUT, not a
// hung process. FFI calls arrive on varying threads, so every entry sets the rank's device.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "../abi/objects.h"
#include "cuda_check.h"
#include "host_copy.h"
#include "kernel_report.h"

namespace sy::cuda {

// One operation's KernelReport in mapped pinned memory: the host and the device view, and an
// event recorded after the operation's last kernel. It goes back to its rank's pool when the
// last holder (the operation's status, its handle) lets go, and is handed out again only once
// that event has completed: a report is never cleared while a kernel may still write it.
struct ReportSlot {
  KernelReport* host = nullptr;
  KernelReport* device = nullptr;
  cudaEvent_t done = nullptr;
  // Marks the end of the operation's work on `stream`.
  Error seal(cudaStream_t stream) const { return cuda_error(cudaEventRecord(done, stream), "recording a report's end"); }
  // Whether the operation's work has completed.
  bool complete() const { return cudaEventQuery(done) != cudaErrorNotReady; }
};

class ReportPool : public std::enable_shared_from_this<ReportPool> {
 public:
  explicit ReportPool(int device) : device_(device) {}
  ~ReportPool();
  // A cleared report whose previous operation is over.
  Error take(std::shared_ptr<ReportSlot>* out);
  // Allocates the first reports up front: pinned allocations can wait for the device, which an
  // operation's enqueue must never do (a peer's kernel may be waiting for this very thread).
  Error reserve();

 private:
  Error grow();  // another kChunk reports (mu_ held)
  // Reports held at once: one per operation until its outputs are read and its handle settled.
  static constexpr int kChunk = 256;
  int device_;
  std::mutex mu_;
  std::vector<ReportSlot> free_;
  std::vector<ReportSlot> all_;
  std::vector<KernelReport*> chunks_;
};

struct CudaRank {
  int device = 0;
  int sm_count = 0;
  std::shared_ptr<ReportPool> reports;
  std::shared_ptr<StagingPool> staging;  // every copy between the host and the GPU (host_copy.h)
};

inline CudaRank& rank_state(RankCore& r) { return *static_cast<CudaRank*>(r.backend_state.get()); }

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

class CudaStream final : public Stream {
 public:
  CudaStream(std::shared_ptr<GroupCore> g, RankCore& r) : Stream(std::move(g), r.index), rank_(&rank_state(r)) {}
  ~CudaStream() override;
  Error init();
  Error wait_event(Event& event) override;
  Error synchronize(Deadline deadline) override;
  void* native() const override { return stream_; }
  cudaStream_t raw() const { return stream_; }
  CudaRank& rank_state_ref() const { return *rank_; }

 private:
  CudaRank* rank_;
  cudaStream_t stream_ = nullptr;
};

class CudaEvent final : public Event {
 public:
  CudaEvent(std::shared_ptr<GroupCore> g, RankCore& r) : Event(std::move(g), r.index), rank_(&rank_state(r)) {}
  ~CudaEvent() override;
  Error init(bool timed);
  Error record(Stream& stream, std::shared_ptr<OpStatus> status) override;
  Error query() override;
  Error synchronize(Deadline deadline) override;
  Error elapsed_ms(Event& end, double* ms) override;
  cudaEvent_t raw() const { return event_; }

 private:
  // Called once the event completed: the recorded operation's failure, if any.
  Error outcome();
  CudaRank* rank_;
  cudaEvent_t event_ = nullptr;
  std::mutex mu_;
  std::shared_ptr<OpStatus> status_;
  bool recorded_ = false;
  bool timed_ = false;
};

inline CudaStream* as_cuda(Stream& s) { return dynamic_cast<CudaStream*>(&s); }

// The failure a report describes, if any (kernel_report.cu). `rank` is the reporting rank.
// `nic_said`: where the network hop has a proxy, what its NIC engine said when it failed (added
// to an error that says the NIC failed).
Error report_error(const KernelReport& r, int rank, uint32_t epoch, const char* op,
                   const std::function<std::string()>& nic_said = {});
// A timeout record as the error: every rank its `missing` bits name (else the one in `peer`), at
// operation `epoch`.
Error timeout_report_error(const KernelReport& r, int rank, uint32_t epoch);

}  // namespace sy::cuda
