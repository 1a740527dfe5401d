// The CPU proxy (rdma.h): one thread per rank takes the descriptors its kernels post
// (proxy_ring.h) and carries them out through a NIC engine. The engine here is the emulated NIC:
// the ranks attach their windows and signal arrays to an EmulatedFabric, and the proxy copies with
// the CUDA runtime on a stream of its own, so the same code runs on a GPU and on the CPU executor.
// The ranks of one process (virtual nodes) attach their own; between processes, each process's
// fabric holds its own rank's and the peers' as mapped here (their buffers by CUDA IPC, their
// signal arrays in POSIX shared memory, registered where the owner's kernels read them), so a
// signal the proxy raises is a host atomic either way, into memory that stays mapped here after
// the peer has gone. (Not so its buffer: every data put is awaited by its receiver, but after a
// failure a put may still be copying into a peer that has freed its buffer or exited. The CPU
// executor's IPC memory outlives the exporter; CUDA does not promise that.)
//
// With a link model (core/link_model.h) each put leaves when the rank's link is free (its source
// is read then, as a NIC's DMA reads it), and is complete, its signal raised and its ring slot
// freed, when it would have arrived.
//
// Every descriptor is checked before it is carried out (proxy_ring.h, check_descriptor): a
// kernel's bad put is refused, never executed; the proxy then takes nothing more from that
// rank until reset(), and the kernel's waits return Refused.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../../abi/error.h"
#include "../../core/link_model.h"
#include "proxy_channel.cuh"

namespace sy::cuda::transport {

// The ranks the emulated NIC connects, as this process addresses them: their windows and signal
// arrays, and what it carried for each (entries and bytes put by that rank, a put with a signal
// counting as many entries as it raises the signal by: into `counters[rank]` when given, an array
// of `ranks` that outlives the fabric, else its own).
class EmulatedFabric {
 public:
  EmulatedFabric(int ranks, int slots, core::LinkModel model, core::NetworkCounters* counters = nullptr);
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

  using Counters = core::NetworkCounters;
  const Counters& carried(int rank) const { return counters_[rank]; }
  Counters& carried_by(int rank) { return counters_[rank]; }

 private:
  int ranks_, slots_;
  core::LinkModel model_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Window> windows_;
  std::vector<int64_t> in_flight_;  // puts taken to each rank and not yet complete
  std::unique_ptr<Counters[]> own_counters_;
  Counters* counters_;
};

struct ProxyOptions {
  int rank = 0;
  int device = 0;
  int channels = 1;
  uint32_t entries = 64;  // descriptors per channel ring
  // The stream the copies go on: the owner's (kept, never destroyed here), or null for one of
  // the proxy's own at the highest priority.
  cudaStream_t stream = nullptr;
  // This rank's signal array ([ranks][slots] words, zero-filled) in host memory the caller owns
  // and keeps until the proxy is gone (a shared segment other processes' proxies write),
  // registered with CUDA here; null: allocated here.
  uint64_t* signals = nullptr;
};

class Proxy {
 public:
  // Allocates the rings and this rank's signals, attaches `window` to the fabric and starts the
  // thread.
  static Error create(const ProxyOptions& o, EmulatedFabric& fabric, uint8_t* window, uint64_t window_bytes,
                      std::unique_ptr<Proxy>* out);
  ~Proxy();
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;

  // What a kernel driving channel `c` (0 <= c < channels) receives.
  ProxyChannel channel(int c, uint64_t timeout_ns) const;
  // The refusal that stopped the proxy (the first), as an error naming the rank, channel and
  // descriptor; ok() if none.
  Error refusal() const;
  // After a refusal, with no kernel of this rank running: lets the puts it accepted finish (or,
  // after a CUDA error, waits for its stream and drops them), drops what was posted after, clears
  // the refusal and takes descriptors again. Waits at most `timeout_ms`; the reset goes on after
  // a timeout, and a later reset() waits for it again. An error if the drain met a CUDA error.
  Error reset(int64_t timeout_ms = 10000);
  // This rank's signal (source, slot), read on the host.
  uint64_t signal(int source, int slot) const;

 private:
  struct InFlight;
  using Queue = std::deque<InFlight>;
  Proxy(const ProxyOptions& o, EmulatedFabric& fabric);
  void run();
  bool take(Queue& q);
  bool issue(Queue& q);
  bool complete(Queue& q);
  void refuse(int channel, uint64_t index, Refusal why, const std::string& detail);
  void restart(Queue& q);
  void drop(Queue& q);  // forgets every put of the queue (their peers' in-flight counts too)
  int64_t next_wake_ns(const Queue& q) const;

  ProxyOptions o_;
  EmulatedFabric& fabric_;
  uint8_t* window_ = nullptr;
  uint64_t window_bytes_ = 0;
  // Host-mapped: [channels] rings and controls; this rank's signals.
  RdmaDescriptor* rings_ = nullptr;
  ProxyControl* controls_ = nullptr;
  uint64_t* signals_ = nullptr;
  bool signals_registered_ = false;  // the caller's (ProxyOptions::signals): unregistered, not freed
  RdmaDescriptor* d_rings_ = nullptr;
  ProxyControl* d_controls_ = nullptr;
  uint64_t* d_signals_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool own_stream_ = false;
  std::vector<cudaEvent_t> events_;  // one per batch of copies, reused in order
  uint64_t batches_issued_ = 0, batches_done_ = 0;
  std::vector<uint64_t> taken_;  // per channel: descriptors taken
  core::Link link_;

  std::atomic<bool> stop_{false};
  bool attached_ = false;
  bool refused_ = false;       // the thread's: take nothing more
  bool device_error_ = false;  // the thread's: a CUDA call failed; what is in flight is unknown
  mutable std::mutex mu_;  // refusal_ and the reset handshake
  std::condition_variable cv_;
  std::string refusal_;
  uint64_t resets_requested_ = 0, resets_done_ = 0;
  std::thread thread_;
};

}  // namespace sy::cuda::transport
