// Streams, events and kernel grids. Every stream is an OS thread that runs its queue in order, so
// a kernel spinning on a flag that another stream's kernel sets never holds that kernel up (the
// operating system preempts), which is the property spin-waiting protocols need. A kernel runs
// its blocks on up to SY_CUDA_CPU_RESIDENT (default 4) threads at once, the stream's own and
// fresh ones; a block runs to completion on one thread. A watchdog names the kernels that have
// run longer than SY_CUDA_CPU_WATCHDOG_S seconds (default 120) and where their threads wait,
// then aborts: a hang must never outlive a CI job's patience silently.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "executor.h"

#ifdef SY_CUDA_CPU_TSAN
extern "C" void __tsan_read_range(const void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
#endif

using sy::cuda_cpu::QuietLock;
using sy::cuda_cpu::quiet_notify_all;
using sy::cuda_cpu::tsan_acquire;
using sy::cuda_cpu::tsan_release;

CUstream_st::CUstream_st(int dev, unsigned fl, bool legacy)
    : device(dev), flags(fl), hw_(sy::cuda_cpu::queue_for_new_stream(dev, legacy)) {
  thread_ = std::thread([this] { loop(); });
}

CUstream_st::~CUstream_st() { shutdown(); }

sy::cuda_cpu::FiberPool& CUstream_st::fibers() {
#ifdef SY_CUDA_CPU_TSAN
  return own_fibers_;
#else
  static sy::cuda_cpu::FiberPool* shared = new sy::cuda_cpu::FiberPool();  // never destroyed
  return *shared;
#endif
}

void CUstream_st::loop() {
  for (;;) {
    Task* task = nullptr;
    uint64_t seq = 0;
    {
      QuietLock l(mu_);
      l.wait(cv_, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      task = queue_.front();
      queue_.pop_front();
      seq = done_ + 1;
    }
    tsan_acquire(task);  // what the enqueuing thread did before
    hw_->wait_turn(task->ticket);
    if (!task->waits) hw_->advance();
    task->run();
    if (task->waits) hw_->advance();
    delete task;  // its captures die here, after the work, on this thread
    tsan_release(done_token(seq));
    {
      QuietLock l(mu_);
      done_ = seq;
    }
    quiet_notify_all(cv_);
  }
}

uint64_t CUstream_st::push(std::function<void()> run, bool waits) {
  Task* task = new Task{std::move(run), 0, waits};
  tsan_release(task);
  uint64_t seq;
  {
    QuietLock l(mu_);
    task->ticket = hw_->take();  // under the stream's lock: tickets follow the stream's order
    queue_.push_back(task);
    seq = ++enqueued_;
  }
  quiet_notify_all(cv_);
  return seq;
}

void CUstream_st::wait_for(uint64_t seq) {
  {
    QuietLock l(mu_);
    l.wait(cv_, [&] { return done_ >= seq; });
  }
  if (seq > 0) tsan_acquire(done_token(seq));
}

bool CUstream_st::reached(uint64_t seq) {
  bool done;
  {
    QuietLock l(mu_);
    done = done_ >= seq;
  }
  if (done && seq > 0) tsan_acquire(done_token(seq));
  return done;
}

uint64_t CUstream_st::last() {
  QuietLock l(mu_);
  return enqueued_;
}

void CUstream_st::shutdown() {
  {
    QuietLock l(mu_);
    stop_ = true;
  }
  quiet_notify_all(cv_);
  if (thread_.joinable()) thread_.join();
}

namespace sy::cuda_cpu {

uint64_t HardwareQueue::take() {
  QuietLock l(mu);
  return next_ticket++;
}

void HardwareQueue::wait_turn(uint64_t ticket) {
  QuietLock l(mu);
  l.wait(cv, [&] { return serving == ticket; });
}

void HardwareQueue::advance() {
  {
    QuietLock l(mu);
    ++serving;
  }
  quiet_notify_all(cv);
}

namespace {

// The hardware queues of each device, made with its context.
struct DeviceQueues {
  std::vector<std::unique_ptr<HardwareQueue>> queues;
  uint64_t streams = 0;  // streams created, the legacy one aside
};
// Never destroyed (see g_mu below).
std::mutex& g_queues_mu = *new std::mutex();
std::map<int, DeviceQueues>& g_queues = *new std::map<int, DeviceQueues>();

int connections_from_environment() {
  const int n = env_int("CUDA_DEVICE_MAX_CONNECTIONS", 8);
  return n < 1 ? 1 : n > 32 ? 32 : n;
}
const bool g_context_before = env_int("SY_CUDA_CPU_CONTEXT_BEFORE", 0) != 0;
const int g_connections_at_start = connections_from_environment();

// (g_queues_mu held)
DeviceQueues& device_queues(int device) {
  DeviceQueues& d = g_queues[device];
  if (d.queues.empty()) {
    const int n = g_context_before ? g_connections_at_start : connections_from_environment();
    for (int i = 0; i < n; ++i) d.queues.push_back(std::make_unique<HardwareQueue>());
  }
  return d;
}

}  // namespace

void context_created(int device) {
  QuietLock l(g_queues_mu);
  device_queues(device);
}

bool context_exists(int device) {
  QuietLock l(g_queues_mu);
  return g_context_before || g_queues.count(device) != 0;
}

HardwareQueue* queue_for_new_stream(int device, bool legacy) {
  QuietLock l(g_queues_mu);
  DeviceQueues& d = device_queues(device);
  if (legacy) return d.queues[0].get();
  d.streams += 1;
  return d.queues[d.streams % d.queues.size()].get();
}

namespace {

// Like every registry here, never destroyed: stream threads, the watchdog and kernels still
// running when the process exits use them while static destructors run.
std::mutex& g_mu = *new std::mutex();
std::vector<CUstream_st*>& g_streams = *new std::vector<CUstream_st*>();  // every live stream, default ones included
std::map<int, CUstream_st*>& g_default = *new std::map<int, CUstream_st*>();  // each device's legacy default stream
#ifdef SY_CUDA_CPU_TSAN
constexpr int kDefaultResident = 2;
#else
constexpr int kDefaultResident = 4;
#endif
const int g_resident = std::max(1, env_int("SY_CUDA_CPU_RESIDENT", kDefaultResident));

bool is_default(cudaStream_t s) { return s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread; }

CUstream_st* default_stream(int device) {
  QuietLock l(g_mu);
  CUstream_st*& s = g_default[device];
  if (s == nullptr) {
    s = new CUstream_st(device, cudaStreamDefault, true);
    g_streams.push_back(s);
  }
  return s;
}

// ---- the watchdog ------------------------------------------------------------------------

struct Running {
  Block* block;
  const char* kernel;
  std::chrono::steady_clock::time_point since;
};
std::mutex& g_running_mu = *new std::mutex();
std::vector<Running>& g_running = *new std::vector<Running>();

void watch() {
  const double limit = env_double("SY_CUDA_CPU_WATCHDOG_S", 120.0);
  for (;;) {
    std::this_thread::sleep_for(std::chrono::seconds(1));
    QuietLock l(g_running_mu);
    const auto now = std::chrono::steady_clock::now();
    bool expired = false;
    for (const Running& r : g_running) expired = expired || std::chrono::duration<double>(now - r.since).count() > limit;
    if (!expired) continue;
    std::fprintf(stderr, "cuda_on_cpu: watchdog: a kernel has run for over %.0f s (SY_CUDA_CPU_WATCHDOG_S); running blocks:\n",
                 limit);
    for (const Running& r : g_running) {
      std::fprintf(stderr, "kernel %s, for %.1f s:\n%s", r.kernel, std::chrono::duration<double>(now - r.since).count(),
                   describe_block(*r.block).c_str());
    }
    std::fflush(stderr);
    std::abort();
  }
}

}  // namespace

void block_started(Block* b, const char* kernel) {
  static std::once_flag once;
  std::call_once(once, [] { std::thread(watch).detach(); });
  QuietLock l(g_running_mu);
  g_running.push_back({b, kernel, std::chrono::steady_clock::now()});
}

void block_finished(Block* b) {
  QuietLock l(g_running_mu);
  for (size_t i = 0; i < g_running.size(); ++i) {
    if (g_running[i].block == b) {
      g_running[i] = g_running.back();
      g_running.pop_back();
      return;
    }
  }
}

int resident_blocks() { return g_resident; }

CUstream_st* resolve(cudaStream_t s) { return is_default(s) ? default_stream(current_device) : s; }

// The legacy default stream waits for every blocking stream of its device, and they wait for it
// (CUDA's implicit synchronisation); non-blocking streams are independent of it.
uint64_t enqueue(cudaStream_t s, std::function<void()> task, bool waits) {
  CUstream_st* st = resolve(s);
  // Under the registry's lock, so that a task on the legacy stream and one on a blocking stream
  // enqueued at the same time by two threads still wait one for the other.
  QuietLock l(g_mu);
  std::vector<std::pair<CUstream_st*, uint64_t>> before;
  const bool legacy = is_default(s);
  for (CUstream_st* o : g_streams) {
    if (o == st || o->device != st->device || o->flags != cudaStreamDefault) continue;
    const bool other_is_default = o == g_default[st->device];
    if (legacy || (st->flags == cudaStreamDefault && other_is_default)) before.emplace_back(o, o->last());
  }
  if (before.empty()) return st->push(std::move(task), waits);
  return st->push(
      [before = std::move(before), task = std::move(task)] {
        for (const auto& [o, seq] : before) o->wait_for(seq);
        task();
      },
      true);
}

void register_stream(CUstream_st* s) {
  QuietLock l(g_mu);
  g_streams.push_back(s);
}

void unregister_stream(CUstream_st* s) {
  QuietLock l(g_mu);
  g_streams.erase(std::remove(g_streams.begin(), g_streams.end(), s), g_streams.end());
}

void synchronize_device(int device) {
  std::vector<std::pair<CUstream_st*, uint64_t>> marks;
  {
    QuietLock l(g_mu);
    for (CUstream_st* s : g_streams)
      if (device < 0 || s->device == device) marks.emplace_back(s, s->last());
  }
  for (const auto& [s, seq] : marks) s->wait_for(seq);
}

void annotate_read(const void* p, size_t n) {
#ifdef SY_CUDA_CPU_TSAN
  if (n) __tsan_read_range(p, n);
#else
  (void)p;
  (void)n;
#endif
}

void annotate_write(void* p, size_t n) {
#ifdef SY_CUDA_CPU_TSAN
  if (n) __tsan_write_range(p, n);
#else
  (void)p;
  (void)n;
#endif
}

namespace {

// SY_CUDA_CPU_FAIL_LAUNCH=KERNEL[:N]: the N-th launch (default the first) of KERNEL in the
// process fails as if the GPU lacked the resources, for tests of what a failed launch leaves.
bool injected_launch_failure(const char* kernel) {
  static const std::string& spec = *new std::string([] {  // never destroyed: launches at exit read it
    const char* v = std::getenv("SY_CUDA_CPU_FAIL_LAUNCH");
    return v ? v : "";
  }());
  if (spec.empty()) return false;
  const size_t colon = spec.find(':');
  const std::string name = spec.substr(0, colon);
  const long nth = colon == std::string::npos ? 1 : std::atol(spec.c_str() + colon + 1);
  if (name != kernel) return false;
  static std::atomic<long> seen{0};
  return seen.fetch_add(1) + 1 == nth;
}

// SY_CUDA_CPU_DELAY_START=KERNEL:MS[:N]: every launch of KERNEL (only the N-th, with N) starts
// MS milliseconds after its turn, as if work queued before it on its stream ran that long (its
// queue waits too). One late launch is one rank that falls behind its peers.
int injected_start_delay_ms(const char* kernel) {
  static const std::string& spec = *new std::string([] {
    const char* v = std::getenv("SY_CUDA_CPU_DELAY_START");
    return v ? v : "";
  }());
  const size_t colon = spec.find(':');
  if (colon == std::string::npos || spec.compare(0, colon, kernel) != 0) return 0;
  const int ms = std::max(0, std::atoi(spec.c_str() + colon + 1));
  const size_t second = spec.find(':', colon + 1);
  if (second == std::string::npos) return ms;
  static std::atomic<long> seen{0};
  return seen.fetch_add(1) + 1 == std::atol(spec.c_str() + second + 1) ? ms : 0;
}

}  // namespace

cudaError_t enqueue_kernel(const LaunchConfig& config, std::function<void()> body) {
  if (injected_launch_failure(config.kernel)) return fail(cudaErrorLaunchOutOfResources);
  const int delay_ms = injected_start_delay_ms(config.kernel);
  const unsigned threads = config.block.x * config.block.y * config.block.z;
  const uint64_t blocks = uint64_t(config.grid.x) * config.grid.y * config.grid.z;
  if (threads == 0 || threads > 1024 || config.block.z > 64 || blocks == 0 || config.grid.y > 65535 ||
      config.grid.z > 65535)
    return fail(cudaErrorInvalidConfiguration);
  if (config.shared_bytes > 227 * 1024) return fail(cudaErrorInvalidValue);
  const int device = current_device;
  FiberPool* pool = &resolve(config.stream)->fibers();
  enqueue(config.stream, [config, body = std::move(body), blocks, device, pool, delay_ms]() {
    if (delay_ms) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    std::atomic<uint64_t> next{0};
    // Race detector: every GPU thread's end, then the stream's next operation. On the heap, so
    // that the detector forgets it with the kernel (a stack slot outlives it, with its history).
    auto done = std::make_unique<char>(0);
    auto worker = [&]() {
      current_device = device;
      for (;;) {
        const uint64_t i = next.fetch_add(1);
        if (i >= blocks) return;
        const uint3 index = make_uint3(unsigned(i % config.grid.x), unsigned((i / config.grid.x) % config.grid.y),
                                       unsigned(i / (uint64_t(config.grid.x) * config.grid.y)));
        run_block(body, config, index, *pool, done.get());
      }
    };
    const uint64_t n = std::min<uint64_t>(blocks, uint64_t(g_resident));
    std::vector<std::thread> workers;
    for (uint64_t k = 1; k < n; ++k) workers.emplace_back(worker);
    worker();
    for (std::thread& w : workers) w.join();
    tsan_acquire(done.get());
  });
  return cudaSuccess;
}

}  // namespace sy::cuda_cpu
