// The rest of the CUDA runtime API on the CPU executor: errors, devices, streams, events,
// occupancy. The devices are SY_CUDA_CPU_DEVICES (default 1) virtual sm_90 GPUs with 132 SMs,
// named so that nobody mistakes them for hardware; every pair may access each other.
#include <atomic>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda_on_cpu/inspect.h"
#include "executor.h"

namespace sy::cuda_cpu {

thread_local int current_device = 0;

namespace {

thread_local cudaError_t tl_last = cudaSuccess;

// The calling thread's watch for calls graph capture forbids (inspect.h).
struct HostWaitWatch {
  bool on = false;
  size_t count[2] = {0, 0};  // waits, polls
  std::string calls[2];
};
thread_local HostWaitWatch tl_watch;

}  // namespace

void note_host_wait(const char* call, bool poll) {
  if (!tl_watch.on) return;
  ++tl_watch.count[poll];
  std::string& calls = tl_watch.calls[poll];
  if (calls.size() < 4096) calls += (calls.empty() ? "" : ", ") + std::string(call);
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

double env_double(const char* name, double fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atof(v) : fallback;
}

cudaError_t fail(cudaError_t e) {
  tl_last = e;
  return e;
}

int device_count() {
  static const int n = std::clamp(env_int("SY_CUDA_CPU_DEVICES", 1), 1, 64);
  return n;
}

}  // namespace sy::cuda_cpu

using namespace sy::cuda_cpu;

namespace {

bool valid_device(int d) { return d >= 0 && d < device_count(); }

constexpr int kSms = 132;

}  // namespace

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = tl_last;
  tl_last = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return tl_last; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorMapBufferObjectFailed: return "cudaErrorMapBufferObjectFailed";
    case cudaErrorDeviceUninitialized: return "cudaErrorDeviceUninitialized";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorTimeout: return "cudaErrorTimeout";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorMapBufferObjectFailed: return "mapping of buffer object failed";
    case cudaErrorDeviceUninitialized: return "invalid device context";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorNotSupported: return "operation not supported (on the CPU executor)";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorTimeout: return "wait operation timed out";
    default: return cudaGetErrorName(e);
  }
}

cudaError_t cudaGetDeviceCount(int* n) {
  *n = device_count();
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int d) {
  if (!valid_device(d)) return fail(cudaErrorInvalidDevice);
  current_device = d;
  context_created(d);  // as CUDA 12 and later do
  return cudaSuccess;
}

namespace {

// Driver calls the library asks for: whether a device's primary context exists (here), and the
// dma-buf export of device memory (memory.cpp).
int primary_context_state(int device, unsigned int* flags, int* active) {
  if (!valid_device(device)) return 101;  // CUDA_ERROR_INVALID_DEVICE
  if (flags != nullptr) *flags = 0;
  *active = context_exists(device) ? 1 : 0;
  return 0;
}

}  // namespace

cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int version, unsigned long long,
                                             cudaDriverEntryPointQueryResult* status) {
  if (symbol == nullptr || fn == nullptr || version > CUDART_VERSION) return fail(cudaErrorInvalidValue);
  *fn = std::string(symbol) == "cuDevicePrimaryCtxGetState" && version >= 7000
            ? reinterpret_cast<void*>(&primary_context_state)
            : memory_driver_call(symbol, version);
  if (status != nullptr) *status = *fn != nullptr ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* d) {
  *d = current_device;
  return cudaSuccess;
}

cudaError_t cudaSetDeviceFlags(unsigned int) { return cudaSuccess; }

// No driver: the runtime is the toolkit's headers' version.
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (!valid_device(d)) return fail(cudaErrorInvalidDevice);
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "CPU executor device %d (no GPU)", d);
  p->totalGlobalMem = 16ull << 30;
  p->sharedMemPerBlock = 48 * 1024;
  p->sharedMemPerBlockOptin = 227 * 1024;
  p->sharedMemPerMultiprocessor = 228 * 1024;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = 1024;
  p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 0x7fffffff;
  p->maxGridSize[1] = 65535;
  p->maxGridSize[2] = 65535;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = kSms;
  p->maxThreadsPerMultiProcessor = 2048;
  p->maxBlocksPerMultiProcessor = 32;
  p->canMapHostMemory = 1;
  p->unifiedAddressing = 1;
  p->concurrentKernels = 1;
  p->asyncEngineCount = 2;
  p->l2CacheSize = 50 << 20;
  p->pciDeviceID = d;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
  cudaDeviceProp p;
  if (cudaGetDeviceProperties(&p, d) != cudaSuccess) return fail(cudaErrorInvalidDevice);
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = p.multiProcessorCount; break;
    case cudaDevAttrMaxThreadsPerBlock: *v = p.maxThreadsPerBlock; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrComputeCapabilityMajor: *v = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *v = p.minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(p.sharedMemPerBlockOptin); break;
    case cudaDevAttrCanMapHostMemory: *v = 1; break;
    case cudaDevAttrUnifiedAddressing: *v = 1; break;
    // A NIC's writes (the ibverbs engine's, into host memory here) are flushed like a GPU's:
    // the flush is a fence, and nothing orders them without it.
    case cudaDevAttrGPUDirectRDMAFlushWritesOptions: *v = cudaFlushGPUDirectRDMAWritesOptionHost; break;
    case cudaDevAttrGPUDirectRDMAWritesOrdering: *v = cudaGPUDirectRDMAWritesOrderingNone; break;
    default: return fail(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceCanAccessPeer(int* can, int a, int b) {
  if (!valid_device(a) || !valid_device(b)) return fail(cudaErrorInvalidDevice);
  *can = a != b;
  return cudaSuccess;
}

cudaError_t cudaDeviceEnablePeerAccess(int peer, unsigned int) {
  return valid_device(peer) && peer != current_device ? cudaSuccess : fail(cudaErrorInvalidDevice);
}

// SY_CUDA_CPU_P2P_ATOMICS=0 models GPUs joined by PCIe: peer access without native atomics.
cudaError_t cudaDeviceGetP2PAttribute(int* v, cudaDeviceP2PAttr attr, int a, int b) {
  if (!valid_device(a) || !valid_device(b)) return fail(cudaErrorInvalidDevice);
  static const bool atomics = env_int("SY_CUDA_CPU_P2P_ATOMICS", 1) != 0;
  *v = attr == cudaDevP2PAttrNativeAtomicSupported && a != b ? (atomics ? 1 : 0) : 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceFlushGPUDirectRDMAWrites(cudaFlushGPUDirectRDMAWritesTarget target,
                                               cudaFlushGPUDirectRDMAWritesScope) {
  if (target != cudaFlushGPUDirectRDMAWritesTargetCurrentDevice) return fail(cudaErrorInvalidValue);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  note_host_wait("cudaDeviceSynchronize");
  synchronize_device(current_device);
  return cudaSuccess;
}

// ---- streams -----------------------------------------------------------------------------

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int flags) {
  *s = new CUstream_st(current_device, flags);
  register_stream(*s);
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }

cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned int flags, int) {
  return cudaStreamCreateWithFlags(s, flags);
}

// Hopper's range (lower is more urgent); priorities do not change how the executor schedules.
cudaError_t cudaDeviceGetStreamPriorityRange(int* least, int* greatest) {
  if (least) *least = 0;
  if (greatest) *greatest = -5;
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (s == nullptr) return fail(cudaErrorInvalidResourceHandle);
  s->wait_for(s->last());  // its work completes first, as in CUDA
  unregister_stream(s);
  s->shutdown();  // the object stays: events recorded on it may still be asked about
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  note_host_wait("cudaStreamSynchronize");
  CUstream_st* st = resolve(s);
  st->wait_for(st->last());
  return cudaSuccess;
}

cudaError_t cudaStreamQuery(cudaStream_t s) {
  note_host_wait("cudaStreamQuery", true);
  CUstream_st* st = resolve(s);
  return st->reached(st->last()) ? cudaSuccess : cudaErrorNotReady;
}

// ---- events ------------------------------------------------------------------------------

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int flags) {
  *e = new CUevent_st;
  (*e)->flags = flags;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }

cudaError_t cudaEventDestroy(cudaEvent_t e) {
  if (e == nullptr) return fail(cudaErrorInvalidResourceHandle);
  delete e;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (e == nullptr) return fail(cudaErrorInvalidResourceHandle);
  auto ns = std::make_shared<std::atomic<int64_t>>(0);
  const uint64_t seq = enqueue(s, [ns] {
    ns->store(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
                  .count());
  });
  QuietLock l(e->mu);
  e->stream = resolve(s);
  e->seq = seq;
  e->ns = std::move(ns);
  return cudaSuccess;
}

namespace {

std::pair<CUstream_st*, uint64_t> last_record(cudaEvent_t e) {
  QuietLock l(e->mu);
  return {e->stream, e->seq};
}

bool event_done(cudaEvent_t e) {
  const auto [s, seq] = last_record(e);
  return s == nullptr || s->reached(seq);
}

}  // namespace

cudaError_t cudaEventQuery(cudaEvent_t e) {
  note_host_wait("cudaEventQuery", true);
  if (e == nullptr) return fail(cudaErrorInvalidResourceHandle);
  return event_done(e) ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  note_host_wait("cudaEventSynchronize");
  if (e == nullptr) return fail(cudaErrorInvalidResourceHandle);
  const auto [s, seq] = last_record(e);
  if (s != nullptr) s->wait_for(seq);
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned int) {
  if (e == nullptr) return fail(cudaErrorInvalidResourceHandle);
  const auto [es, seq] = last_record(e);
  if (es == nullptr) return cudaSuccess;
  enqueue(s, [es = es, seq = seq] { es->wait_for(seq); }, true);
  return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (a == nullptr || b == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if ((a->flags | b->flags) & cudaEventDisableTiming) return fail(cudaErrorInvalidResourceHandle);
  if (!event_done(a) || !event_done(b)) return fail(cudaErrorNotReady);
  int64_t from, to;
  {
    QuietLock l(a->mu);
    from = a->ns->load();
  }
  {
    QuietLock l(b->mu);
    to = b->ns->load();
  }
  *ms = float(double(to - from) * 1e-6);
  return cudaSuccess;
}

// ---- occupancy and function attributes ---------------------------------------------------

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int threads, size_t shared) {
  const int by_threads = threads > 0 ? 2048 / threads : 0;
  const int by_shared = shared ? int((228 * 1024) / shared) : 32;
  *n = std::max(0, std::min({by_threads, by_shared, 32}));
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }

// ---- inspection (cuda_on_cpu/inspect.h) ----------------------------------------------------

void sy_cuda_cpu_watch_host_waits(int on) {
  if (on) tl_watch = HostWaitWatch{};
  tl_watch.on = on != 0;
}

size_t sy_cuda_cpu_host_waits(int polls, char* out, size_t n) {
  const int kind = polls ? 1 : 0;
  if (out != nullptr && n > 0) {
    const size_t len = std::min(n - 1, tl_watch.calls[kind].size());
    std::memcpy(out, tl_watch.calls[kind].data(), len);
    out[len] = 0;
  }
  return tl_watch.count[kind];
}

}  // extern "C"
