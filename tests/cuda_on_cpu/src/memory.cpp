// Memory on the CPU executor. Device, pinned and mapped memory are all host memory of one address
// space (a device pointer is the host pointer), registered so that copies know which side is
// pageable. cudaMalloc's memory is a memfd mapping, so that CUDA IPC works between processes as
// on a GPU (see "IPC" below). What a GPU leaves undefined is made visible:
//   * cudaMalloc*, cudaHostAlloc and cudaMallocAsync memory starts as 0xCB bytes
//     (SY_CUDA_CPU_POISON=0 turns that off);
//   * cudaFreeHost frees at once, without waiting for kernels that may still read the memory (a
//     GPU does not wait either): under AddressSanitizer such a read is a reported use after free;
//   * cudaFreeAsync frees when its stream reaches it.
// cudaFree waits for the device first, as CUDA's does; code that calls it while a peer's kernel
// waits for the calling thread deadlocks here as it would on a GPU. So does a pageable copy
// behind another thread's pageable copy that waits for its stream (cudaMemcpyAsync below).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <cuda.h>

#include "executor.h"

#ifdef SY_CUDA_CPU_ASAN
#include <sanitizer/asan_interface.h>
#endif

using namespace sy::cuda_cpu;

namespace {

enum class Kind { Device, Pinned };

// How an allocation was made: from the heap (cudaMallocAsync, pinned memory), as a memfd mapping
// this process may export (cudaMalloc), as another process's such mapping, opened by handle, or
// as the caller's own memory, registered (cudaHostRegister: the caller frees it, after
// cudaHostUnregister).
enum class Origin { Heap, Exportable, Imported, Registered };

struct Allocation {
  size_t bytes;
  Kind kind;
  Origin origin = Origin::Heap;
  size_t mapped = 0;  // the mapping's length, its guard page included (not Heap)
  int fd = -1;        // the memfd (Exportable)
  uint64_t id = 0;    // the memfd's name says it: a recycled descriptor number is not mistaken for it
  int device = 0;     // current when it was allocated or opened
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
  g_allocations[p] = Allocation{n, kind, Origin::Heap, 0, -1, 0, current_device};
  return p;
}

// A function, not a global: cudaMalloc may run during another file's static initialisation.
size_t page_size() {
  static const size_t page = size_t(sysconf(_SC_PAGESIZE));
  return page;
}

// Maps `fd`'s first `bytes` (rounded up to a page) followed by one inaccessible page, so that an
// overrun faults as it would on a GPU; under AddressSanitizer the slack between the end and that
// page is poisoned as well, so an overrun by one byte is reported. nullptr on failure.
void* map_with_guard(int fd, size_t bytes, size_t* mapped) {
  const size_t body = (bytes + page_size() - 1) / page_size() * page_size() + (bytes == 0 ? page_size() : 0);
  void* area = mmap(nullptr, body + page_size(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (area == MAP_FAILED) return nullptr;
  if (mmap(area, body, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
    munmap(area, body + page_size());
    return nullptr;
  }
  *mapped = body + page_size();
#ifdef SY_CUDA_CPU_ASAN
  __asan_poison_memory_region(static_cast<char*>(area) + bytes, body - bytes);
#endif
  return area;
}

void unmap_with_guard(void* p, size_t mapped) {
#ifdef SY_CUDA_CPU_ASAN
  __asan_unpoison_memory_region(p, mapped - page_size());  // the addresses may be mapped again
#endif
  munmap(p, mapped);
}

std::string memfd_name(uint64_t id) {
  char name[40];
  std::snprintf(name, sizeof name, "sy-cuda-cpu-%016llx", static_cast<unsigned long long>(id));
  return name;
}

// cudaMalloc: device memory another process can open by IPC handle.
void* allocate_exportable(size_t n) {
  uint64_t id = 0;
  if (getrandom(&id, sizeof id, 0) != sizeof id) return nullptr;
  const int fd = memfd_create(memfd_name(id).c_str(), MFD_CLOEXEC);
  if (fd < 0) return nullptr;
  size_t mapped = 0;
  void* p = nullptr;
  if (ftruncate(fd, off_t((n + page_size() - 1) / page_size() * page_size() + (n == 0 ? page_size() : 0))) != 0 ||
      (p = map_with_guard(fd, n, &mapped)) == nullptr) {
    close(fd);
    return nullptr;
  }
  if (g_poison) std::memset(p, 0xCB, n);
  QuietLock l(g_mu);
  g_allocations[p] = Allocation{n, Kind::Device, Origin::Exportable, mapped, fd, id, current_device};
  return p;
}

cudaError_t release(void* p, Kind kind) {
  if (p == nullptr) return cudaSuccess;
  Allocation a;
  {
    QuietLock l(g_mu);
    auto it = g_allocations.find(p);
    // Memory opened by IPC handle is closed with cudaIpcCloseMemHandle, registered memory
    // unregistered: never freed here.
    if (it == g_allocations.end() || it->second.kind != kind || it->second.origin == Origin::Imported ||
        it->second.origin == Origin::Registered) {
      return fail(cudaErrorInvalidValue);
    }
    a = it->second;
    g_allocations.erase(it);
  }
  if (a.origin == Origin::Heap) {
    std::free(p);
  } else {
    unmap_with_guard(p, a.mapped);
    close(a.fd);  // a process that opened it keeps its own mapping
  }
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
  note_host_wait("cudaMalloc");
  *p = allocate_exportable(n);
  return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFree(void* p) {
  note_host_wait("cudaFree");
  synchronize_device(current_device);
  return release(p, Kind::Device);
}

cudaError_t cudaMallocHost(void** p, size_t n) {
  note_host_wait("cudaMallocHost");
  *p = allocate(n, Kind::Pinned);
  return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaHostAlloc(void** p, size_t n, unsigned int) { return cudaMallocHost(p, n); }  // counted there

cudaError_t cudaFreeHost(void* p) {
  note_host_wait("cudaFreeHost");
  return release(p, Kind::Pinned);
}

// The caller's memory becomes pinned and mapped (its device pointer is its own address); as in
// CUDA, a range that overlaps memory already registered or allocated here is refused.
cudaError_t cudaHostRegister(void* p, size_t n, unsigned int) {
  note_host_wait("cudaHostRegister");
  if (p == nullptr || n == 0) return fail(cudaErrorInvalidValue);
  QuietLock l(g_mu);
  auto next = g_allocations.lower_bound(p);
  if (next != g_allocations.end() && static_cast<char*>(next->first) < static_cast<char*>(p) + n) {
    return fail(cudaErrorHostMemoryAlreadyRegistered);
  }
  if (find(p, 1) != nullptr) return fail(cudaErrorHostMemoryAlreadyRegistered);
  g_allocations[p] = Allocation{n, Kind::Pinned, Origin::Registered, 0, -1, 0, current_device};
  return cudaSuccess;
}

cudaError_t cudaHostUnregister(void* p) {
  note_host_wait("cudaHostUnregister");
  QuietLock l(g_mu);
  auto it = g_allocations.find(p);
  if (it == g_allocations.end() || it->second.origin != Origin::Registered) {
    return fail(cudaErrorHostMemoryNotRegistered);
  }
  g_allocations.erase(it);
  return cudaSuccess;
}

// Memory this runtime made or opened: its kind and device (the device current when it was made,
// in the exporting process for memory opened by IPC handle).
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* p) {
  if (attr == nullptr) return fail(cudaErrorInvalidValue);
  std::memset(attr, 0, sizeof *attr);
  QuietLock l(g_mu);
  const Allocation* a = find(p, 1);
  if (a == nullptr) {
    attr->type = cudaMemoryTypeUnregistered;
    attr->device = -2;
    attr->hostPointer = const_cast<void*>(p);
    return cudaSuccess;
  }
  attr->type = a->kind == Kind::Device ? cudaMemoryTypeDevice : cudaMemoryTypeHost;
  attr->device = a->device;
  attr->devicePointer = const_cast<void*>(p);
  attr->hostPointer = a->kind == Kind::Device ? nullptr : const_cast<void*>(p);
  return cudaSuccess;
}

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
    auto it = g_allocations.find(p);
    // Memory opened by IPC handle is closed, never freed.
    if (p != nullptr && (it == g_allocations.end() || it->second.origin == Origin::Imported)) {
      return fail(cudaErrorInvalidValue);
    }
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
// asynchronous. And as on a GPU (seen on an H200, 2026-11-30): the driver stages pageable copies
// one at a time per device, so a copy into pageable memory that waits for its stream holds up
// every other thread's pageable copy on that device until it is done, even one on an unrelated
// stream (a virtual rank's upload behind a peer's read of a dispatch waiting for that upload's
// rank deadlocks until the kernels' deadline).
static std::mutex g_pageable[64];

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  const bool pageable_src = !runtime_memory(src), pageable_dst = !runtime_memory(dst);
  std::unique_lock<std::mutex> staging(g_pageable[current_device & 63], std::defer_lock);
  if (pageable_src || pageable_dst) staging.lock();
  if (pageable_src) {
    annotate_read(src, n);
    // Owned by the task alone: it is freed on the stream's thread, after the copy (the race
    // detector sees no ordering through this file's reference counts).
    auto staged = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(src),
                                                               static_cast<const unsigned char*>(src) + n);
    const uint64_t seq = enqueue(s, [dst, staged = std::move(staged), n] {
      annotate_write(dst, n);
      std::memcpy(dst, staged->data(), n);
    });
    if (pageable_dst) resolve(s)->wait_for(seq);  // pageable to pageable: synchronous
    return cudaSuccess;
  }
  const uint64_t seq = enqueue(s, [dst, src, n] {
    annotate_read(src, n);
    annotate_write(dst, n);
    std::memmove(dst, src, n);
  });
  if (pageable_dst) resolve(s)->wait_for(seq);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  note_host_wait("cudaMemcpy");
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
  note_host_wait("cudaMemset");
  const cudaError_t rc = cudaMemsetAsync(p, v, n, nullptr);
  if (rc == cudaSuccess) resolve(nullptr)->wait_for(resolve(nullptr)->last());
  return rc;
}

}  // extern "C"

// IPC. A handle names the exporting process, the descriptor of the allocation's memfd there, the
// memfd's random id and the allocation's size:
//   [0, 8) "sycpuipc"  [8, 12) pid  [12, 16) fd  [16, 24) bytes  [24, 32) id  [32, 36) device
//   (the rest zero; the device is the exporter's, which cudaPointerGetAttributes reports)
// Opening it opens /proc/<pid>/fd/<fd>, which the kernel allows to processes of the exporter's
// user only (the ptrace read check), as CUDA's handles are; the descriptor's link must name the
// memfd of that id, so a handle whose allocation was freed (its descriptor number since reused)
// or that was forged is refused. A handle opens in any other process, each opening a mapping of
// its own, until the exporter frees the memory or exits.
namespace {

constexpr char kIpcMagic[8] = {'s', 'y', 'c', 'p', 'u', 'i', 'p', 'c'};

struct IpcFields {
  pid_t pid;
  int fd;
  uint64_t bytes;
  uint64_t id;
  int device;
};

void put_fields(cudaIpcMemHandle_t* h, const IpcFields& f) {
  std::memset(h, 0, sizeof *h);
  std::memcpy(h->reserved, kIpcMagic, 8);
  std::memcpy(h->reserved + 8, &f.pid, 4);
  std::memcpy(h->reserved + 12, &f.fd, 4);
  std::memcpy(h->reserved + 16, &f.bytes, 8);
  std::memcpy(h->reserved + 24, &f.id, 8);
  std::memcpy(h->reserved + 32, &f.device, 4);
}

bool get_fields(const cudaIpcMemHandle_t& h, IpcFields* f) {
  if (std::memcmp(h.reserved, kIpcMagic, 8) != 0) return false;
  std::memcpy(&f->pid, h.reserved + 8, 4);
  std::memcpy(&f->fd, h.reserved + 12, 4);
  std::memcpy(&f->bytes, h.reserved + 16, 8);
  std::memcpy(&f->id, h.reserved + 24, 8);
  std::memcpy(&f->device, h.reserved + 32, 4);
  for (size_t i = 36; i < sizeof h.reserved; ++i)
    if (h.reserved[i] != 0) return false;
  return f->pid > 0 && f->fd >= 0 && f->device >= 0;
}

}  // namespace

extern "C" {

cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* h, void* p) {
  if (h == nullptr) return fail(cudaErrorInvalidValue);
  IpcFields f{getpid(), -1, 0, 0, 0};
  {
    QuietLock l(g_mu);
    auto it = g_allocations.find(p);
    // As with CUDA: the start of cudaMalloc's memory (not pooled, not another process's).
    if (it == g_allocations.end() || it->second.origin != Origin::Exportable) return fail(cudaErrorInvalidValue);
    f.fd = it->second.fd;
    f.bytes = it->second.bytes;
    f.id = it->second.id;
    f.device = it->second.device;
  }
  put_fields(h, f);
  return cudaSuccess;
}

cudaError_t cudaIpcOpenMemHandle(void** p, cudaIpcMemHandle_t h, unsigned int) {
  if (p == nullptr) return fail(cudaErrorInvalidValue);
  *p = nullptr;
  IpcFields f;
  if (!get_fields(h, &f)) return fail(cudaErrorInvalidResourceHandle);
  // As in CUDA, a process does not open its own handles (it has the memory already).
  if (f.pid == getpid()) return fail(cudaErrorDeviceUninitialized);  // "invalid device context"
  const std::string path = "/proc/" + std::to_string(f.pid) + "/fd/" + std::to_string(f.fd);
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return fail(cudaErrorInvalidResourceHandle);  // exited, or another user's
  // What was opened, not what the path named a moment before: the exporter may have freed the
  // memory and reused the descriptor number since.
  const std::string expected = "/memfd:" + memfd_name(f.id) + " (deleted)";
  const std::string self = "/proc/self/fd/" + std::to_string(fd);
  char link[128];
  const ssize_t n = readlink(self.c_str(), link, sizeof link - 1);
  if (n < 0 || size_t(n) != expected.size() || std::memcmp(link, expected.data(), size_t(n)) != 0) {
    close(fd);
    return fail(cudaErrorInvalidResourceHandle);  // freed, or forged
  }
  struct stat st;
  size_t mapped = 0;
  void* q = nullptr;
  if (fstat(fd, &st) != 0 || uint64_t(st.st_size) < f.bytes || (q = map_with_guard(fd, f.bytes, &mapped)) == nullptr) {
    close(fd);
    return fail(cudaErrorMapBufferObjectFailed);
  }
  close(fd);  // the mapping holds the memory
  QuietLock l(g_mu);
  g_allocations[q] = Allocation{size_t(f.bytes), Kind::Device, Origin::Imported, mapped, -1, f.id, f.device};
  *p = q;
  return cudaSuccess;
}

cudaError_t cudaIpcCloseMemHandle(void* p) {
  size_t mapped = 0;
  {
    QuietLock l(g_mu);
    auto it = g_allocations.find(p);
    if (it == g_allocations.end() || it->second.origin != Origin::Imported) return fail(cudaErrorInvalidValue);
    mapped = it->second.mapped;
    g_allocations.erase(it);
  }
  unmap_with_guard(p, mapped);
  return cudaSuccess;
}

}  // extern "C"

// Driver calls, handed out by cudaGetDriverEntryPointByVersion (runtime_api.cpp) as the runtime
// hands out the driver's: the two a NIC needs to register device memory through dma-buf (the ibverbs engine's
// ibv_reg_dmabuf_mr). A dma-buf of device memory is one more view of its pages; here it is the
// allocation's memfd, which is exactly that. Where CUDA hands out a dma-buf for any page-aligned
// range inside an allocation, this runtime hands out only one that starts at the allocation's
// start (a memfd cannot carry an offset): CUDA_ERROR_NOT_SUPPORTED for the others, so code that
// needs them finds out here rather than on a GPU.
namespace {

CUresult CUDAAPI mem_get_address_range(CUdeviceptr* base, size_t* size, CUdeviceptr p) {
  QuietLock l(g_mu);
  auto it = g_allocations.upper_bound(reinterpret_cast<void*>(p));
  if (it == g_allocations.begin()) return CUDA_ERROR_NOT_FOUND;
  --it;
  const auto start = reinterpret_cast<CUdeviceptr>(it->first);
  if (it->second.kind != Kind::Device || p >= start + it->second.bytes) return CUDA_ERROR_NOT_FOUND;
  if (base) *base = start;
  if (size) *size = it->second.bytes;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI mem_get_handle_for_address_range(void* handle, CUdeviceptr p, size_t size, CUmemRangeHandleType type,
                                                  unsigned long long flags) {
  if (handle == nullptr || type != CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD) return CUDA_ERROR_INVALID_VALUE;
  if (flags != 0) return CUDA_ERROR_NOT_SUPPORTED;  // a BAR1 mapping: no PCIe here
  if (size == 0 || p % page_size() != 0 || size % page_size() != 0) return CUDA_ERROR_INVALID_VALUE;
  QuietLock l(g_mu);
  auto it = g_allocations.find(reinterpret_cast<void*>(p));
  if (it == g_allocations.end()) return CUDA_ERROR_NOT_SUPPORTED;  // inside an allocation, or not one
  const Allocation& a = it->second;
  const size_t pages = (a.bytes + page_size() - 1) / page_size() * page_size();
  if (a.origin != Origin::Exportable || size > pages) return CUDA_ERROR_INVALID_VALUE;
  const int fd = fcntl(a.fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  *static_cast<int*>(handle) = fd;
  return CUDA_SUCCESS;
}

}  // namespace

namespace sy::cuda_cpu {

void* memory_driver_call(const char* symbol, unsigned int version) {
  if (std::strcmp(symbol, "cuMemGetAddressRange") == 0 && version >= 3020)
    return reinterpret_cast<void*>(&mem_get_address_range);
  if (std::strcmp(symbol, "cuMemGetHandleForAddressRange") == 0 && version >= 11070)
    return reinterpret_cast<void*>(&mem_get_handle_for_address_range);
  return nullptr;
}

}  // namespace sy::cuda_cpu
