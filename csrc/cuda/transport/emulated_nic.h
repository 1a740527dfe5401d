// The emulated NIC (nic_engine.h): the ranks attach their windows and signal arrays to an
// EmulatedFabric, and each rank's engine copies with the CUDA runtime on a stream of its own, so
// the same code runs on a GPU and on the CPU executor. The ranks of one process (virtual nodes)
// attach their own; between processes, each process's fabric holds its own rank's and the peers'
// as mapped here (their buffers by CUDA IPC, their signal arrays in POSIX shared memory,
// registered where the owner's kernels read them), so a signal the engine raises is a host
// atomic either way, into memory that stays mapped here after the peer has gone. (Not so its
// buffer: every data put is awaited by its receiver, but after a failure a put may still be
// copying into a peer that has freed its buffer or exited. The CPU executor's IPC memory
// outlives the exporter; CUDA does not promise that.)
//
// With a link model (core/link_model.h) each put leaves when the rank's link is free (its source
// is read then, as a NIC's DMA reads it), and is complete, its signal raised, when it would have
// arrived.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "nic_engine.h"

namespace sy::cuda::transport {

// The ranks the emulated NIC connects, as this process addresses them: their windows and signal
// arrays.
class EmulatedFabric {
 public:
  EmulatedFabric(int ranks, int slots, core::LinkModel model);
  int ranks() const { return ranks_; }
  int slots() const { return slots_; }
  const core::LinkModel& model() const { return model_; }

  struct Window {
    uint8_t* base = nullptr;  // device memory
    uint64_t bytes = 0;
    uint64_t* signals = nullptr;  // host-mapped, [ranks][slots]
  };
  void attach(int rank, const Window& w);
  // Refuses new puts to the rank, then waits until the peers' puts in flight to it are complete
  // (their copies and signals write into its memory), at most `timeout_ms`; false if they were not.
  bool detach(int rank, int64_t timeout_ms);
  // The rank's window for one put, counted as in flight to it until release(rank); base ==
  // nullptr (nothing counted) if it has none.
  Window acquire(int rank);
  void release(int rank);

 private:
  int ranks_, slots_;
  core::LinkModel model_;
  std::mutex mu_;
  std::vector<Window> windows_;
  PutsInFlight in_flight_;  // puts taken to each rank and not yet complete
};

// One rank's engine on the fabric. `stream` is the owner's (kept, never destroyed here), or null
// for one of its own at the highest priority.
class EmulatedNic final : public NicEngine {
 public:
  static Error create(EmulatedFabric& fabric, int rank, uint8_t* window, uint64_t window_bytes, cudaStream_t stream,
                      std::unique_ptr<NicEngine>* out);
  ~EmulatedNic() override;

  int ranks() const override { return fabric_.ranks(); }
  int slots() const override { return fabric_.slots(); }
  const char* name() const override { return "emulated NIC"; }
  Error start(uint64_t* signals) override;
  Refusal accept(NicPut& p, int64_t now_ns) override;
  NicStep issue(NicQueue& q, int64_t now_ns, std::string* error, size_t* failed) override;
  NicStep done(const NicPut& front, int64_t now_ns, std::string* error) override;
  void finish(NicPut& p) override;
  void forget(NicPut& p) override;
  void quiesce() override;
  int64_t wake_in_ns(const NicPut& front, int64_t now_ns) const override;
  bool detach(int64_t timeout_ms) override;

 private:
  EmulatedNic(EmulatedFabric& fabric, int rank) : fabric_(fabric), rank_(rank) {}

  EmulatedFabric& fabric_;
  int rank_;
  uint8_t* window_ = nullptr;
  uint64_t window_bytes_ = 0;
  bool attached_ = false;
  cudaStream_t stream_ = nullptr;
  bool own_stream_ = false;
  std::vector<cudaEvent_t> events_;  // one per batch of copies, reused in order
  uint64_t batches_issued_ = 0, batches_done_ = 0;
  core::Link link_;
};

}  // namespace sy::cuda::transport
