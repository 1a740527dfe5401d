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
// where a release belongs is a reported race. Its own locks are hidden from the detector
// (QuietLock): TSan intercepts every mutex, and the executor's bookkeeping locks would otherwise
// order the host after every GPU task that happened to finish first. With SY_CUDA_CPU_ASAN it
// announces every fiber switch to AddressSanitizer.
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
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
#endif

namespace sy::cuda_cpu {

// Race-detector annotations; nothing without ThreadSanitizer.
inline void tsan_acquire(const void* token) {
#ifdef SY_CUDA_CPU_TSAN
  __tsan_acquire(const_cast<void*>(token));
#else
  (void)token;
#endif
}
inline void tsan_release(const void* token) {
#ifdef SY_CUDA_CPU_TSAN
  __tsan_release(const_cast<void*>(token));
#else
  (void)token;
#endif
}
inline void tsan_quiet_begin() {
#ifdef SY_CUDA_CPU_TSAN
  AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
#endif
}
inline void tsan_quiet_end() {
#ifdef SY_CUDA_CPU_TSAN
  AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
#endif
}
// The bookkeeping's own memory (queues, registries, their heap blocks) is not the detector's
// business either: only guarded by quiet locks, it would look racy.
inline void tsan_unwatched_begin() {
#ifdef SY_CUDA_CPU_TSAN
  AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
#endif
}
inline void tsan_unwatched_end() {
#ifdef SY_CUDA_CPU_TSAN
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
  AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
#endif
}

// A lock of the executor's bookkeeping, invisible to the race detector (see above), and so is
// what it guards: orderings CUDA promises are annotated explicitly instead (tsan_release and
// tsan_acquire still count inside).
class QuietLock {
 public:
  explicit QuietLock(std::mutex& m) : lock_(m, std::defer_lock) {
    tsan_quiet_begin();
    lock_.lock();
    tsan_quiet_end();
    tsan_unwatched_begin();
  }
  ~QuietLock() {
    tsan_unwatched_end();
    tsan_quiet_begin();
    lock_.unlock();
    tsan_quiet_end();
  }
  QuietLock(const QuietLock&) = delete;
  QuietLock& operator=(const QuietLock&) = delete;
  template <class Pred>
  void wait(std::condition_variable& cv, Pred done) {
    tsan_quiet_begin();
    cv.wait(lock_, done);
    tsan_quiet_end();
  }

 private:
  std::unique_lock<std::mutex> lock_;
};

inline void quiet_notify_all(std::condition_variable& cv) {
  tsan_quiet_begin();
  cv.notify_all();
  tsan_quiet_end();
}

int env_int(const char* name, int fallback);
double env_double(const char* name, double fallback);

// ---- fibers (fiber.cpp) --------------------------------------------------------------------

constexpr size_t kStackBytes = 256 * 1024;

// A fiber's stack (kStackBytes above a guard page) and, under ThreadSanitizer, the race
// detector's fiber that runs on it: pooled together per stream and never freed. Creating a
// detector fiber costs far more than the GPU thread it would run, and a stack reused by the same
// detector fiber needs no forgetting. The price: a GPU thread inherits what the previous user of
// its detector fiber had synchronised with. So under ThreadSanitizer pools are per stream, where
// work is ordered anyway (without it, one pool serves all: every fiber stack is two memory
// mappings, and a process may hold only so many). Within one kernel, a race between two blocks
// that ran one after the other on the same fibers can go unseen (blocks that run at the same
// time, up to SY_CUDA_CPU_RESIDENT, are checked against each other).
struct FiberStack {
  char* base = nullptr;
  void* tsan = nullptr;
};
struct FiberPool {
  std::mutex mu;
  std::vector<FiberStack> stacks;
};
// Blocks of one kernel running at once (SY_CUDA_CPU_RESIDENT; default 4, and 2 under
// ThreadSanitizer, whose fibers are costly and limited in number).
int resident_blocks();
FiberStack take_stack(FiberPool& pool);
void give_stack(FiberPool& pool, FiberStack s);

// The stack pointer a fiber starts from: its first switch-in calls entry(arg) on `s`, below
// `top` (the fiber's bookkeeping may sit above it).
void* initial_stack_pointer(char* top, void (*entry)(void*), void* arg);

// Where a switch comes from and goes to, for the sanitizers.
struct SwitchTarget {
  const void* stack_bottom = nullptr;  // AddressSanitizer: the stack being switched to
  size_t stack_bytes = 0;
  void* tsan_fiber = nullptr;  // ThreadSanitizer: the fiber (or thread) being switched to
};
// Saves the current context into *save_sp and continues at `to`. `leaving`: the current fiber
// has ended and is never switched back to (AddressSanitizer frees its fake stack).
void switch_context(void** save_sp, void* to, const SwitchTarget& target, bool leaving = false);
// First thing on a new fiber's stack: completes the switch that started it and reports the stack
// it came from.
void entered_fiber(const void** from_bottom, size_t* from_bytes);

// ---- blocks (block.cpp) --------------------------------------------------------------------

struct Block;
// Runs one block of a kernel to completion on the calling thread, its GPU threads on fibers of
// `pool`. Every GPU thread releases `done` as it ends; the stream acquires it once the kernel is
// over (race detector).
void run_block(const std::function<void()>& body, const LaunchConfig& config, uint3 block_index, FiberPool& pool,
               void* done);
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
// The driver call `symbol` of memory.cpp (dma-buf export) at CUDA `version`, or nullptr.
void* memory_driver_call(const char* symbol, unsigned int version);

// ---- errors ----------------------------------------------------------------------------------

cudaError_t fail(cudaError_t e);  // sets the thread's last error
extern thread_local int current_device;
int device_count();

}  // namespace sy::cuda_cpu

// A stream: one OS thread running its queue in order (kernels, copies, event marks). Created by
// cudaStreamCreate*, or one per device for the legacy default stream.
//
// For the race detector, whoever enqueues a task comes before it (its queue node is the token),
// and task n's end is released on a token of its own, which whoever learns that task n is done
// acquires (wait_for, reached): a host thread is ordered after the tasks it waited for, not
// after every task that happened to finish first.
namespace sy::cuda_cpu {
// A hardware work queue of a device (CUDA_DEVICE_MAX_CONNECTIONS of them, default 8): streams
// share them round-robin in creation order, the legacy default stream taking queue 0, and a
// queue starts its work in the order it was enqueued, whatever the stream. A task at the head
// that cannot start (its stream's previous work still runs, or it waits for an event) holds up
// everything behind it, other streams' work included: the false dependency that can deadlock
// kernels of ranks that wait for each other.
struct HardwareQueue {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t next_ticket = 0, serving = 0;
  uint64_t take();
  void wait_turn(uint64_t ticket);
  void advance();
};
// The queue of the next stream created on `device` (`legacy`: the default stream's).
HardwareQueue* queue_for_new_stream(int device, bool legacy);
// The device's primary context exists from here on: the first stream or cudaSetDevice creates
// it, and it reads CUDA_DEVICE_MAX_CONNECTIONS then, as the driver does. With
// SY_CUDA_CPU_CONTEXT_BEFORE=1 the contexts exist before the program starts (someone else
// created them), so the variable as it was at start-up counts.
void context_created(int device);
bool context_exists(int device);
}  // namespace sy::cuda_cpu

struct CUstream_st {
  CUstream_st(int device, unsigned flags, bool legacy = false);
  ~CUstream_st();
  // Appends a task; returns its sequence number (the first is 1). A task that `waits` (for an
  // event) keeps its hardware queue until the wait is over; others free it when they start.
  uint64_t push(std::function<void()> task, bool waits = false);
  // Waits until task `seq` has run.
  void wait_for(uint64_t seq);
  // Whether task `seq` has run.
  bool reached(uint64_t seq);
  uint64_t last();
  void shutdown();

  const int device;
  const unsigned flags;
  // The stacks (and detector fibers) of this stream's kernels: its own under ThreadSanitizer,
  // else one pool for all streams.
  sy::cuda_cpu::FiberPool& fibers();

 private:
  struct Task {
    std::function<void()> run;
    uint64_t ticket;
    bool waits;
  };
  // Tokens of task ends, reused every kRing tasks (a reuse only adds ordering: a race could
  // then go unseen, never be invented).
  static constexpr uint64_t kRing = 1024;
  const char* done_token(uint64_t seq) const { return &done_tokens_[seq % kRing]; }
  void loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task*> queue_;
  uint64_t enqueued_ = 0, done_ = 0;
  bool stop_ = false;
  std::unique_ptr<char[]> done_tokens_{new char[kRing]()};
  sy::cuda_cpu::FiberPool own_fibers_;
  sy::cuda_cpu::HardwareQueue* hw_;
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
uint64_t enqueue(cudaStream_t s, std::function<void()> task, bool waits = false);
void register_stream(CUstream_st* s);
void unregister_stream(CUstream_st* s);
// Waits for all work queued so far on every stream of `device` (every device if -1).
void synchronize_device(int device);
// What the executor's own copies read and write, told to the race detector (its files are not
// instrumented): a kernel racing with a copy is reported.
void annotate_read(const void* p, size_t n);
void annotate_write(void* p, size_t n);
// A call CUDA-graph capture forbids, made by the calling thread: a wait (a host wait, an
// allocation outside the stream order) or a poll (`poll`); counted while the thread is watched
// (cuda_on_cpu/inspect.h).
void note_host_wait(const char* call, bool poll = false);

}  // namespace sy::cuda_cpu
