// Internals of the CPU executor, shared by its sources:
//   fiber.cpp        fiber stacks and the context switch (with the sanitizers' fiber hooks)
//   block.cpp        one block: its GPU threads as fibers, barriers, warp collectives, shared
//                    memory, and the diagnostics (deadlock, divergence, mask misuse)
//   stream.cpp       streams (one OS thread each), events, kernel grids, the watchdog
//   memory.cpp       device, pinned and mapped memory, copies, IPC handles
//   runtime_api.cpp  devices, errors and the remaining runtime calls
//
// Sanitizers. The executor's own files are never instrumented; the kernels' are. Built with
// SY_CUDA_CPU_TSAN it tells ThreadSanitizer exactly the happens-before edges CUDA promises
// (barriers, warp collectives, kernel and stream order, events; the kernels' acquire/release
// atomics TSan sees by itself) and nothing more, so a missing __syncthreads or a plain store
// where a release belongs is a reported race. With SY_CUDA_CPU_ASAN it announces every fiber
// switch to AddressSanitizer.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#ifdef SY_CUDA_CPU_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace sy::cuda_cpu {

int env_int(const char* name, int fallback);
double env_double(const char* name, double fallback);

// ---- fibers (fiber.cpp) --------------------------------------------------------------------

constexpr size_t kStackBytes = 256 * 1024;

// A fiber's stack (kStackBytes above a guard page) and, under ThreadSanitizer, the race
// detector's fiber that runs on it: pooled together and never freed. Creating a detector fiber
// costs far more than the GPU thread it would run, and a stack reused by the same detector fiber
// needs no forgetting. The price: a GPU thread inherits what the previous user of its detector
// fiber had synchronised with, so a race between two blocks of one kernel that ran one after the
// other on the same worker thread can go unseen (blocks that run at the same time, up to
// SY_CUDA_CPU_RESIDENT, are checked against each other).
struct FiberStack {
  char* base = nullptr;
  void* tsan = nullptr;
};
FiberStack take_stack();
void give_stack(FiberStack s);

// The stack pointer a fiber starts from: its first switch-in calls entry(arg) on `s`, below
// `top` (the fiber's bookkeeping may sit above it).
void* initial_stack_pointer(char* top, void (*entry)(void*), void* arg);

// Where a switch comes from and goes to, for the sanitizers.
struct SwitchTarget {
  const void* stack_bottom = nullptr;  // AddressSanitizer: the stack being switched to
  size_t stack_bytes = 0;
  void* tsan_fiber = nullptr;  // ThreadSanitizer: the fiber (or thread) being switched to
};
// Saves the current context into *save_sp and continues at `to`.
void switch_context(void** save_sp, void* to, const SwitchTarget& target);
// First thing on a new fiber's stack: completes the switch that started it and reports the stack
// it came from.
void entered_fiber(const void** from_bottom, size_t* from_bytes);

// ---- blocks (block.cpp) --------------------------------------------------------------------

struct Block;
// Runs one block of a kernel to completion on the calling thread. Every GPU thread releases
// `done` as it ends; the stream acquires it once the kernel is over (race detector).
void run_block(const std::function<void()>& body, const LaunchConfig& config, uint3 block_index, void* done);
// One line per group of the block's threads that wait at the same place (watchdog report).
std::string describe_block(const Block& b);

// ---- running kernels (stream.cpp) ----------------------------------------------------------

// The blocks now running, for the watchdog.
void block_started(Block* b, const char* kernel);
void block_finished(Block* b);

// ---- memory (memory.cpp) -------------------------------------------------------------------

// Whether p lies in memory the runtime allocated (device, pinned or mapped); else it is
// pageable host memory.
bool runtime_memory(const void* p);

// ---- errors ----------------------------------------------------------------------------------

cudaError_t fail(cudaError_t e);  // sets the thread's last error
extern thread_local int current_device;
int device_count();

}  // namespace sy::cuda_cpu

// A stream: one OS thread running its queue in order (kernels, copies, event marks). Created by
// cudaStreamCreate*, or one per device for the legacy default stream.
struct CUstream_st {
  CUstream_st(int device, unsigned flags);
  ~CUstream_st();
  // Appends a task; returns its sequence number (the first is 1).
  uint64_t push(std::function<void()> task);
  void wait_for(uint64_t seq);
  bool reached(uint64_t seq);
  uint64_t last();
  void shutdown();

  const int device;
  const unsigned flags;

 private:
  void loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  uint64_t enqueued_ = 0, done_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

// An event: the stream and sequence number of its last record, and the time that record ran.
// The queued record holds the time cell, not the event (an event may be destroyed while its
// record is pending).
struct CUevent_st {
  std::mutex mu;
  CUstream_st* stream = nullptr;  // streams are never freed (cudaStreamDestroy)
  uint64_t seq = 0;
  std::shared_ptr<std::atomic<int64_t>> ns = std::make_shared<std::atomic<int64_t>>(0);
  unsigned flags = 0;
};

struct CUmemPoolHandle_st {
  int device = 0;
};

namespace sy::cuda_cpu {

// The stream a cudaStream_t names (the legacy default stream of the current device for 0).
CUstream_st* resolve(cudaStream_t s);
// Queues `task` on `s` in CUDA's order, the legacy default stream's implicit synchronisation with
// blocking streams included; returns its sequence number on resolve(s).
uint64_t enqueue(cudaStream_t s, std::function<void()> task);
void register_stream(CUstream_st* s);
void unregister_stream(CUstream_st* s);
// Waits for all work queued so far on every stream of `device` (every device if -1).
void synchronize_device(int device);
// What the executor's own copies read and write, told to the race detector (its files are not
// instrumented): a kernel racing with a copy is reported.
void annotate_read(const void* p, size_t n);
void annotate_write(void* p, size_t n);

}  // namespace sy::cuda_cpu
