// The CPU proxy (rdma.h): one thread per rank takes the descriptors its kernels post
// (proxy_ring.h) and carries them out through a NIC engine (nic_engine.h): the emulated NIC
// (emulated_nic.h) or ibverbs (verbs_engine.h).
//
// Every descriptor is checked before it is carried out (proxy_ring.h, check_descriptor): a
// kernel's bad put is refused, never executed; the proxy then takes nothing more from that
// rank until reset(), and the kernel's waits return Refused.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../../abi/error.h"
#include "nic_engine.h"
#include "proxy_channel.cuh"

namespace sy::cuda::transport {

struct ProxyOptions {
  int rank = 0;
  int device = 0;
  int channels = 1;
  uint32_t entries = 64;  // descriptors per channel ring
  // This rank's signal array ([ranks][slots] words, zero-filled) in host memory the caller owns
  // and keeps until the proxy is gone (a shared segment other processes' proxies write),
  // registered with CUDA here; null: allocated here.
  uint64_t* signals = nullptr;
  // What this rank put on the network (tests and benchmarks read it); outlives the proxy.
  core::NetworkCounters* counters = nullptr;
  // The channel every signal to rank r in slot s must be raised on: [ranks][signal_slots] channel
  // indices, or empty (any). NCCL GIN reads a signal in the context (channel) that raised it, so a
  // protocol that runs on GIN raises each slot of a rank on one channel; the proxy refuses a
  // signal raised on another (Refusal::SignalChannel), so that runs without GIN keep its rule.
  std::vector<int32_t> signal_channels;
  int signal_slots = 0;
};

class Proxy {
 public:
  // Allocates the rings and this rank's signals, starts the engine on them and starts the thread.
  static Error create(const ProxyOptions& o, std::unique_ptr<NicEngine> engine, std::unique_ptr<Proxy>* out);
  ~Proxy();
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;

  // What a kernel driving channel `c` (0 <= c < channels) receives.
  ProxyChannel channel(int c, uint64_t timeout_ns) const;
  // The refusal that stopped the proxy (the first), as an error naming the rank, channel and
  // descriptor; ok() if none.
  Error refusal() const;
  // Reads the refusal's text ("" if none), also after the proxy is gone (an operation's error is
  // worded when its work has completed, maybe after its buffer was released).
  std::function<std::string()> refusal_reader() const;
  // After a refusal, with no kernel of this rank running: lets the puts it accepted finish (or,
  // after an engine's failure, waits until nothing it started touches memory and drops them), drops what was posted after, clears
  // the refusal and takes descriptors again. Waits at most `timeout_ms`; the reset goes on after
  // a timeout, and a later reset() waits for it again. An error if the drain met an engine's failure.
  Error reset(int64_t timeout_ms = 10000);
  // This rank's signal (source, slot), read on the host.
  uint64_t signal(int source, int slot) const;

 private:
  explicit Proxy(const ProxyOptions& o) : o_(o) {}
  void run();
  bool take(NicQueue& q);
  Refusal signal_channel_refusal(const NicPut& f) const;  // ProxyOptions::signal_channels
  bool issue(NicQueue& q);
  bool complete(NicQueue& q);
  bool progress();
  // `channel` -1: an engine's failure that belongs to no descriptor.
  void refuse(int channel, uint64_t index, Refusal why, const std::string& detail);
  void restart(NicQueue& q);
  void drop(NicQueue& q);  // forgets every put of the queue
  int64_t next_wake_ns(const NicQueue& q) const;

  ProxyOptions o_;
  std::unique_ptr<NicEngine> engine_;
  // Host-mapped: [channels] rings and controls; this rank's signals.
  RdmaDescriptor* rings_ = nullptr;
  ProxyControl* controls_ = nullptr;
  uint64_t* signals_ = nullptr;
  bool signals_registered_ = false;  // the caller's (ProxyOptions::signals): unregistered, not freed
  RdmaDescriptor* d_rings_ = nullptr;
  ProxyControl* d_controls_ = nullptr;
  uint64_t* d_signals_ = nullptr;
  std::vector<uint64_t> taken_;  // per channel: descriptors taken
  core::NetworkCounters own_counters_;

  std::atomic<bool> stop_{false};
  bool started_ = false;  // the engine was started: detach() before the window goes
  bool refused_ = false;       // the thread's: take nothing more
  bool device_error_ = false;  // the thread's: the engine failed; what is in flight is unknown
  mutable std::mutex mu_;  // the reset handshake
  std::condition_variable cv_;
  struct RefusalText {
    std::mutex mu;
    std::string text;
  };
  std::shared_ptr<RefusalText> refusal_ = std::make_shared<RefusalText>();
  uint64_t resets_requested_ = 0, resets_done_ = 0;
  std::thread thread_;
};

}  // namespace sy::cuda::transport
