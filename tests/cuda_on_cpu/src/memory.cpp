// Memory on the CPU executor. Device, pinned and mapped memory are all host memory of one address
// space (a device pointer is the host pointer), registered so that copies know which side is
// pageable. What a GPU leaves undefined is made visible:
//   * cudaMalloc*, cudaHostAlloc and cudaMallocAsync memory starts as 0xCB bytes
//     (SY_CUDA_CPU_POISON=0 turns that off);
//   * cudaFreeHost frees at once, without waiting for kernels that may still read the memory (a
//     GPU does not wait either): under AddressSanitizer such a read is a reported use after free;
//   * cudaFreeAsync frees when its stream reaches it.
// cudaFree waits for the device first, as CUDA's does; code that calls it while a peer's kernel
// waits for the calling thread deadlocks here as it would on a GPU.
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "executor.h"

using namespace sy::cuda_cpu;

namespace {

enum class Kind { Device, Pinned };

struct Allocation {
  size_t bytes;
  Kind kind;
};

// Never destroyed: kernels still running at process exit look allocations up.
std::mutex& g_mu = *new std::mutex();
std::map<void*, Allocation>& g_allocations = *new std::map<void*, Allocation>();
const bool g_poison = env_int("SY_CUDA_CPU_POISON", 1) != 0;
CUmemPoolHandle_st g_pools[64];

void* allocate(size_t n, Kind kind) {
  void* p = nullptr;
  if (posix_memalign(&p, 256, n ? n : 1) != 0) return nullptr;
  if (g_poison) std::memset(p, 0xCB, n);
  QuietLock l(g_mu);
  g_allocations[p] = Allocation{n, kind};
  return p;
}

cudaError_t release(void* p, Kind kind) {
  if (p == nullptr) return cudaSuccess;
  {
    QuietLock l(g_mu);
    auto it = g_allocations.find(p);
    if (it == g_allocations.end() || it->second.kind != kind) return fail(cudaErrorInvalidValue);
    g_allocations.erase(it);
  }
  std::free(p);
  return cudaSuccess;
}

// The allocation holding [p, p + n), if the runtime made one.
const Allocation* find(const void* p, size_t n) {
  auto it = g_allocations.upper_bound(const_cast<void*>(p));
  if (it == g_allocations.begin()) return nullptr;
  --it;
  const auto* base = static_cast<const char*>(it->first);
  const auto* q = static_cast<const char*>(p);
  return q + n <= base + it->second.bytes ? &it->second : nullptr;
}

}  // namespace

namespace sy::cuda_cpu {

bool runtime_memory(const void* p) {
  QuietLock l(g_mu);
  return find(p, 1) != nullptr;
}

}  // namespace sy::cuda_cpu

extern "C" {

cudaError_t cudaMalloc(void** p, size_t n) {
  *p = allocate(n, Kind::Device);
  return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFree(void* p) {
  synchronize_device(current_device);
  return release(p, Kind::Device);
}

cudaError_t cudaMallocHost(void** p, size_t n) {
  *p = allocate(n, Kind::Pinned);
  return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaHostAlloc(void** p, size_t n, unsigned int) { return cudaMallocHost(p, n); }

cudaError_t cudaFreeHost(void* p) { return release(p, Kind::Pinned); }

cudaError_t cudaHostGetDevicePointer(void** device, void* host, unsigned int) {
  {
    QuietLock l(g_mu);
    const Allocation* a = find(host, 1);
    if (a == nullptr || a->kind != Kind::Pinned) return fail(cudaErrorInvalidValue);
  }
  *device = host;
  return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) {
  *p = allocate(n, Kind::Device);
  return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFreeAsync(void* p, cudaStream_t s) {
  {
    QuietLock l(g_mu);
    if (p != nullptr && g_allocations.count(p) == 0) return fail(cudaErrorInvalidValue);
  }
  enqueue(s, [p] { release(p, Kind::Device); });
  return cudaSuccess;
}

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
  if (device < 0 || device >= device_count()) return fail(cudaErrorInvalidDevice);
  g_pools[device].device = device;
  *pool = &g_pools[device];
  return cudaSuccess;
}

cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return cudaSuccess; }
cudaError_t cudaMemPoolSetAccess(cudaMemPool_t, const cudaMemAccessDesc*, size_t) { return cudaSuccess; }

// As in CUDA: a copy from pageable memory reads its source before returning (it is staged); a
// copy into pageable memory returns once it is done; between device and pinned memory it is
// asynchronous.
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  if (!runtime_memory(src)) {
    annotate_read(src, n);
    // Owned by the task alone: it is freed on the stream's thread, after the copy (the race
    // detector sees no ordering through this file's reference counts).
    auto staged = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(src),
                                                               static_cast<const unsigned char*>(src) + n);
    const uint64_t seq = enqueue(s, [dst, staged = std::move(staged), n] {
      annotate_write(dst, n);
      std::memcpy(dst, staged->data(), n);
    });
    if (!runtime_memory(dst)) resolve(s)->wait_for(seq);  // pageable to pageable: synchronous
    return cudaSuccess;
  }
  const uint64_t seq = enqueue(s, [dst, src, n] {
    annotate_read(src, n);
    annotate_write(dst, n);
    std::memmove(dst, src, n);
  });
  if (!runtime_memory(dst)) resolve(s)->wait_for(seq);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  const cudaError_t rc = cudaMemcpyAsync(dst, src, n, kind, nullptr);
  if (rc == cudaSuccess) resolve(nullptr)->wait_for(resolve(nullptr)->last());
  return rc;
}

cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  enqueue(s, [p, v, n] {
    annotate_write(p, n);
    std::memset(p, v, n);
  });
  return cudaSuccess;
}

cudaError_t cudaMemset(void* p, int v, size_t n) {
  const cudaError_t rc = cudaMemsetAsync(p, v, n, nullptr);
  if (rc == cudaSuccess) resolve(nullptr)->wait_for(resolve(nullptr)->last());
  return rc;
}

// IPC within one process: the handle is the pointer and the process id (another process's
// handle is refused).
cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* h, void* p) {
  {
    QuietLock l(g_mu);
    auto it = g_allocations.find(p);
    if (it == g_allocations.end() || it->second.kind != Kind::Device) return fail(cudaErrorInvalidValue);
  }
  std::memset(h, 0, sizeof *h);
  const pid_t pid = getpid();
  std::memcpy(h->reserved, &p, sizeof p);
  std::memcpy(h->reserved + sizeof p, &pid, sizeof pid);
  return cudaSuccess;
}

cudaError_t cudaIpcOpenMemHandle(void** p, cudaIpcMemHandle_t h, unsigned int) {
  pid_t pid;
  std::memcpy(&pid, h.reserved + sizeof(void*), sizeof pid);
  if (pid != getpid()) return fail(cudaErrorNotSupported);
  std::memcpy(p, h.reserved, sizeof *p);
  return cudaSuccess;
}

cudaError_t cudaIpcCloseMemHandle(void*) { return cudaSuccess; }

}  // extern "C"
