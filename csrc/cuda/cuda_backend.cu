// The CUDA backend: device discovery, device memory, CUDA IPC, copies, the layout kernel, and
// the normal-mode operations (cuda_normal.cu). The CUDA runtime is linked statically, so on a
// machine without a driver every call fails cleanly and the backend reports why.
#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../abi/strided.h"
#include "../core/routing.h"
#include "../host/shared_memory.h"
#include "cuda_check.h"
#include "cuda_ll.h"
#include "cuda_normal.h"
#include "cuda_objects.h"
#include "layout_kernel.h"
#include "device_memory.h"

#ifndef SY_CUDA_ARCHS
#define SY_CUDA_ARCHS ""
#endif

#if SY_CUDA_ON_CPU
inline constexpr const char* kExecutedOnCpu = "CUDA backend executed on the CPU (no GPU)";
#endif

namespace sy {

namespace cuda {
namespace {

// Zero-filled device memory: from the stream-ordered pool (`pooled`, device_memory.h), or from
// cudaMalloc (what CUDA IPC can export).
Error allocate_on(int dev, uint64_t bytes, bool pooled, std::shared_ptr<Memory>* out) {
  void* p = nullptr;
  const uint64_t size = core::align_up(bytes == 0 ? 256 : bytes, 256);
  if (pooled) {
    SY_CUDA(allocate_device_memory(dev, size, &p));
  } else {
    SY_CUDA(cudaSetDevice(dev));
    SY_CUDA(cudaMalloc(&p, size));
    cudaError_t rc = cudaMemset(p, 0, size);
    if (rc != cudaSuccess) {
      cudaFree(p);
      return cuda_error(rc, "zero-filling new device memory");
    }
  }
  auto m = std::make_shared<Memory>();
  m->ptr = p;
  m->bytes = size;
  m->device = dev;
  m->release = [dev, pooled](void* q) {
    if (pooled) {
      release_device_memory(q, dev);
    } else {
      cudaSetDevice(dev);
      cudaFree(q);
    }
  };
  *out = std::move(m);
  return ok();
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int devices) : devices_(devices) {}
  sy_backend kind() const override { return SY_BACKEND_CUDA; }
  bool dispatch_supported() const override { return true; }

  Error init_rank(GroupCore& group, RankCore& rank) override {
    auto st = std::make_shared<CudaRank>();
    // Virtual ranks spread from the first device (rank.device); a process uses its own device.
    st->device = group.process_group ? rank.device % devices_ : (rank.device + rank.index) % devices_;
    rank.device = st->device;
    SY_CUDA(cudaSetDevice(st->device));
    SY_CUDA(cudaDeviceGetAttribute(&st->sm_count, cudaDevAttrMultiProcessorCount, st->device));
    st->reports = std::make_shared<ReportPool>(st->device);
    SY_TRY(st->reports->reserve());
    st->staging = std::make_shared<StagingPool>(st->device);
    SY_TRY(st->staging->reserve());
    rank.backend_state = st;
    return ok();
  }

  // Between processes, a buffer whose dispatch and combine take two hops shares a second piece of
  // memory under its name: its proxy's signal array, which the peers' proxies raise (a POSIX
  // shared segment, like the host backend's buffers; transport/proxy.h).
  Error export_network(BufferCore& buf, std::string* endpoint) override { return normal_export_network(buf, endpoint); }
  Error import_network(BufferCore& buf, int peer, const std::string& endpoint) override {
    return normal_import_network(buf, peer, endpoint);
  }

  Error init_buffer(BufferCore& buf) override {
    SY_TRY(normal_init_buffer(buf));
    if (!buf.group->process_group || !buf.plan.two_hop()) return ok();
    std::shared_ptr<Memory> signals;
    SY_TRY(host::create_segment(network_signal_bytes(buf.group->num_ranks), &signals));
    // Both names must fit the share (sy_buffer_share::name, NUL included).
    const std::string name = buf.region->share_name + kSignalsTag + signals->share_name;
    if (name.size() >= sizeof(sy_buffer_share::name)) {
      return fail(SY_ERROR_INTERNAL, "the buffer's share name (" + std::to_string(name.size()) +
                                         " bytes) does not fit sy_buffer_share");
    }
    buf.region->share_name = name;
    buf.region->companion = std::move(signals);
    return ok();
  }

  // Virtual ranks: the header, the low-latency halves (the senders write into them) and the
  // exchange page, since the normal-mode kernels pull payloads straight from the peers' tensors
  // (the plan's staging regions, about 1 GB per rank at DeepSeek-V3 shapes, would never be
  // touched). A process group adds the staging areas its peers pull from (normal_kernels.h).
  uint64_t shared_bytes(const core::BufferPlan& plan, bool process_group) const override {
    return normal_shared_bytes(plan, process_group);
  }

  // Tensors and workspaces come from the device's stream-ordered pool and go back to it after
  // all work queued on the library's streams (device_memory.h): never a wait for the device.
  Error allocate(RankCore& rank, uint64_t bytes, std::shared_ptr<Memory>* out) override {
    return allocate_on(rank_state(rank).device, bytes, true, out);
  }

  // Outputs are allocated in the order of the operation's stream and never zero-filled: no
  // memset, no host wait, per call (the kernels write every byte the contract defines).
  Error allocate_output(RankCore& rank, Stream& comm, uint64_t bytes, OutputWritten,
                        std::shared_ptr<Memory>* out) override {
    const int dev = rank_state(rank).device;
    const uint64_t size = core::align_up(bytes == 0 ? 256 : bytes, 256);
    void* p = nullptr;
    SY_CUDA(cudaSetDevice(dev));
    SY_CUDA(cudaMallocAsync(&p, size, as_cuda(comm)->raw()));
    auto m = std::make_shared<Memory>();
    m->ptr = p;
    m->bytes = size;
    m->device = dev;
    m->release = [dev](void* q) { release_device_memory(q, dev); };
    *out = std::move(m);
    return ok();
  }

  Error allocate_shared(RankCore& rank, uint64_t bytes, std::shared_ptr<Memory>* out) override {
    // Virtual ranks of one process address each other's device memory directly; other
    // processes open it through a CUDA IPC handle, which needs memory of cudaMalloc's.
    if (!rank.group->process_group) return allocate(rank, bytes, out);
    SY_TRY(allocate_on(rank_state(rank).device, bytes, false, out));
    cudaIpcMemHandle_t h;
    SY_CUDA(cudaIpcGetMemHandle(&h, (*out)->ptr));
    static const char* hex = "0123456789abcdef";
    std::string name = "cuda-ipc:";
    for (size_t i = 0; i < sizeof h.reserved; ++i) {
      const auto b = static_cast<uint8_t>(h.reserved[i]);
      name += hex[b >> 4];
      name += hex[b & 15];
    }
    (*out)->share_name = name;
    return ok();
  }

  // The name is the buffer's IPC handle, then, for two hops, its signal segment's name.
  Error import_shared(RankCore& rank, const std::string& share, uint64_t bytes, const core::BufferPlan& plan,
                      std::shared_ptr<Memory>* out) override {
    const size_t tag = share.find(kSignalsTag);
    if ((tag != std::string::npos) != plan.two_hop()) {
      return invalid("share", std::string("share: the peer's buffer ") +
                                  (plan.two_hop() ? "comes without the signal segment" : "comes with a signal segment") +
                                  " of the two hops across nodes, which this rank's buffer " +
                                  (plan.two_hop() ? "takes" : "does not take") +
                                  "; every process must load the same library and pass the same options");
    }
    const std::string name = share.substr(0, tag);
    cudaIpcMemHandle_t h;
    const std::string prefix = "cuda-ipc:";
    const auto hex_digit = [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); };
    if (name.rfind(prefix, 0) != 0 || name.size() != prefix.size() + 2 * sizeof h.reserved ||
        !std::all_of(name.begin() + std::ptrdiff_t(prefix.size()), name.end(), hex_digit)) {
      return invalid("share", "share: '" + name.substr(0, 40) + "' is not a CUDA IPC handle");
    }
    std::shared_ptr<Memory> signals;
    if (tag != std::string::npos) {
      SY_TRY(host::open_segment(share.substr(tag + std::strlen(kSignalsTag)),
                                network_signal_bytes(rank.group->num_ranks), &signals));
    }
    auto nibble = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
    for (size_t i = 0; i < sizeof h.reserved; ++i) {
      h.reserved[i] = char(nibble(name[prefix.size() + 2 * i]) << 4 | nibble(name[prefix.size() + 2 * i + 1]));
    }
    const int dev = rank_state(rank).device;
    SY_CUDA(cudaSetDevice(dev));
    void* p = nullptr;
    SY_CUDA(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
    auto m = std::make_shared<Memory>();
    m->ptr = p;
    m->bytes = bytes;
    m->device = dev;
    m->release = [dev](void* q) { release_ipc_mapping(q, dev); };
    m->companion = std::move(signals);
    *out = std::move(m);
    return ok();
  }

  // IPC handles have no name to drop; a signal segment has.
  Error seal_shared(Memory& memory) override {
    return memory.companion ? host::unlink_segment(*memory.companion) : ok();
  }

  Error bind_thread(RankCore& rank) override {
    SY_CUDA(cudaSetDevice(rank_state(rank).device));
    return ok();
  }

  Error nccl_usable() const override { return ok(); }

  Error create_stream(std::shared_ptr<GroupCore> g, RankCore& rank, std::shared_ptr<Stream>* out) override {
    auto s = std::make_shared<CudaStream>(std::move(g), rank);
    SY_TRY(s->init());
    *out = std::move(s);
    return ok();
  }

  Error create_event(std::shared_ptr<GroupCore> g, RankCore& rank, std::shared_ptr<Event>* out,
                     bool timed) override {
    auto e = std::make_shared<CudaEvent>(std::move(g), rank);
    SY_TRY(e->init(timed));
    *out = std::move(e);
    return ok();
  }

  // The mask is in the buffer's own header, device memory: written and read in the order of the
  // communication stream (after the calls enqueued before), through the rank's pinned chunks.
  Error mask_write(BufferCore& buf, int first, int count, uint32_t value) override {
    CudaStream& cs = *as_cuda(*buf.comm_stream);
    const std::vector<uint32_t> v(size_t(count), value);
    return cs.rank_state_ref().staging->to_device(buf.mask() + first, v.data(), 4ull * uint64_t(count), cs.raw(),
                                                  Deadline::after_ms(buf.timeout_ms), buf.rank);
  }
  Error mask_read(BufferCore& buf, uint32_t* out, int n) override {
    CudaStream& cs = *as_cuda(*buf.comm_stream);
    return cs.rank_state_ref().staging->to_host(out, buf.mask(), 4ull * uint64_t(n), cs.raw(),
                                                Deadline::after_ms(buf.timeout_ms), buf.rank);
  }

  // Through the rank's pinned chunks, never the driver's pageable path (host_copy.h).
  Error write_tensor(Stream& s, std::shared_ptr<Tensor> t, const void* src, Deadline deadline) override {
    CudaStream& cs = *as_cuda(s);
    StagingPool& staging = *cs.rank_state_ref().staging;
    if (t->is_dense()) {
      SY_TRY(staging.to_device(t->data(), src, t->dense_bytes(), cs.raw(), deadline, cs.rank));
      return cs.synchronize(deadline);
    }
    // Strided: bring the span over, scatter on the host, send it back.
    std::vector<uint8_t> stage(size_t(span_elements(*t)) * size_t(t->element_size()));
    SY_TRY(staging.to_host(stage.data(), t->data(), stage.size(), cs.raw(), deadline, cs.rank));
    dense_to_strided(*t, static_cast<const uint8_t*>(src), stage.data());
    SY_TRY(staging.to_device(t->data(), stage.data(), stage.size(), cs.raw(), deadline, cs.rank));
    return cs.synchronize(deadline);
  }

  Error copy_tensor(Stream& s, std::shared_ptr<Tensor> dst, std::shared_ptr<Tensor> src) override {
    CudaStream& cs = *as_cuda(s);
    SY_CUDA(cudaSetDevice(cs.rank_state_ref().device));
    SY_CUDA(cudaMemcpyAsync(dst->data(), src->data(), size_t(src->dense_bytes()), cudaMemcpyDefault, cs.raw()));
    return ok();
  }

  Error read_tensor(Stream& s, std::shared_ptr<Tensor> t, void* dst, Deadline deadline) override {
    CudaStream& cs = *as_cuda(s);
    StagingPool& staging = *cs.rank_state_ref().staging;
    if (t->is_dense()) {
      SY_TRY(staging.to_host(dst, t->data(), t->dense_bytes(), cs.raw(), deadline, cs.rank));
    } else {
      std::vector<uint8_t> stage(size_t(span_elements(*t)) * size_t(t->element_size()));
      SY_TRY(staging.to_host(stage.data(), t->data(), stage.size(), cs.raw(), deadline, cs.rank));
      strided_to_dense(*t, stage.data(), static_cast<uint8_t*>(dst));
    }
    // The operation that filled the tensor completed before the copy: did it fail?
    return t->producer ? t->producer->result() : ok();
  }

  Error layout(Stream& comm, std::shared_ptr<LayoutWork> work) override {
    CudaStream& cs = *as_cuda(comm);
    SY_CUDA(cudaSetDevice(cs.rank_state_ref().device));
    std::shared_ptr<ReportSlot> report;
    SY_TRY(cs.rank_state_ref().reports->take(&report));
    const int rank = cs.rank;
    work->status->check_after = [report, rank]() { return report_error(*report->host, rank, 0, "layout"); };
    SY_TRY(launch_layout(cs.raw(), *work, &report->device->problem));
    return report->seal(cs.raw());
  }

  Error reject(BufferCore& buf, Stream& comm, core::OpKind kind, uint32_t epoch) override {
    return normal_reject(buf, *as_cuda(comm), kind, epoch);
  }
  Error dispatch_notify(BufferCore& buf, Stream& comm, std::shared_ptr<DispatchWork> work) override {
    return normal_dispatch_notify(buf, *as_cuda(comm), work);
  }
  Error dispatch_wait_counts(DispatchWork& work, Deadline deadline) override {
    return normal_dispatch_wait_counts(work, deadline);
  }
  Error dispatch_epilogue(BufferCore& buf, Stream& comm, std::shared_ptr<DispatchWork> work) override {
    return normal_dispatch_epilogue(buf, *as_cuda(comm), work);
  }
  void dispatch_abandon(BufferCore& buf, Stream& comm, std::shared_ptr<DispatchWork> work) override {
    normal_dispatch_abandon(buf, *as_cuda(comm), work);
  }
  Error combine(BufferCore& buf, Stream& comm, std::shared_ptr<CombineWork> work) override {
    return normal_combine(buf, *as_cuda(comm), work);
  }
  Error abandon(BufferCore& buf, int peer) override { return normal_abandon(buf, *as_cuda(*buf.comm_stream), peer); }
  Error ll_dispatch_send(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) override {
    return ll_send(buf, *as_cuda(s), work, true);
  }
  Error ll_dispatch_recv(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) override {
    return ll_receive(buf, *as_cuda(s), work, true);
  }
  Error ll_combine_send(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) override {
    return ll_send(buf, *as_cuda(s), work, false);
  }
  Error ll_combine_recv(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) override {
    return ll_receive(buf, *as_cuda(s), work, false);
  }
  Error ll_reject(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work, bool dispatch) override {
    return cuda::ll_reject(buf, *as_cuda(s), work, dispatch);
  }
  Error ll_clean(BufferCore& buf, Stream& s, uint32_t epoch, std::shared_ptr<OpStatus> status) override {
    return cuda::ll_clean(buf, *as_cuda(s), epoch, status);
  }

 private:
  static constexpr const char* kSignalsTag = ";signals=";
  int devices_;
};

}  // namespace
}  // namespace cuda

namespace cuda {
namespace {

// Whether some device's primary context exists already (made by someone else in the process):
// then it has read CUDA_DEVICE_MAX_CONNECTIONS before we could set it.
bool primary_context_exists() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  using GetState = int (*)(int device, unsigned int* flags, int* active);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found;
  if (cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &fn, 12000, cudaEnableDefault, &found) !=
          cudaSuccess ||
      found != cudaDriverEntryPointSuccess || fn == nullptr) {
    cudaGetLastError();
    return true;  // cannot tell: assume the worst
  }
  for (int d = 0; d < count; ++d) {
    unsigned int flags = 0;
    int active = 0;
    if (reinterpret_cast<GetState>(fn)(d, &flags, &active) != 0 || active) return true;
  }
  return false;
}

// Virtual ranks drive two streams each (communication, compute); the driver's default of 8
// hardware queues would put several ranks on one queue, where a kernel waiting for a peer can
// sit in front of the kernel it waits for. The variable counts when the context is made: set
// to 32 unless the user chose a value or a context exists already, and the number of queues
// the context then has goes to device_memory, which hands out streams by queue.
void configure_driver_environment() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Kernels load when the module does, not at their first launch: loading can wait for the
    // device, and a first launch may come while a peer's kernel waits for this very thread.
    setenv("CUDA_MODULE_LOADING", "EAGER", 0);
    if (const char* v = std::getenv("CUDA_DEVICE_MAX_CONNECTIONS"); v != nullptr && *v != 0) {
      char* end = nullptr;
      const long n = std::strtol(v, &end, 10);
      const bool number = end != v && *end == 0 && n >= 1;
      set_hardware_queues(number ? int(n < 32 ? n : 32) : 8,
                          std::string("CUDA_DEVICE_MAX_CONNECTIONS=") + v + (number ? "" : ", not a number: 8"));
    } else {
      // Set before any CUDA call of ours (the driver may read it when it starts, or when the
      // context is made); it counts only if no context existed yet.
      setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 1);
      if (primary_context_exists()) {
        set_hardware_queues(8, "the driver's default of 8: a CUDA context existed before Switchyard could set "
                               "CUDA_DEVICE_MAX_CONNECTIONS");
      } else {
        set_hardware_queues(32, "CUDA_DEVICE_MAX_CONNECTIONS=32, set by Switchyard");
      }
    }
  });
}

// Virtual ranks on different GPUs of one process address each other's memory directly, pool
// memory included. The pools keep what is freed (a caching allocator): operations allocate
// their outputs on every call.
void prepare_devices(int count) {
  for (int a = 0; a < count; ++a) {
    if (cudaSetDevice(a) != cudaSuccess) continue;
    cudaMemPool_t pool;
    if (cudaDeviceGetDefaultMemPool(&pool, a) == cudaSuccess) {
      uint64_t keep = UINT64_MAX;
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
      // Reuse memory only once its free has completed: a dependency on the release stream
      // would make an allocation wait for whatever that stream waits for.
      int no = 0;
      cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &no);
    }
    for (int b = 0; b < count; ++b) {
      int can = 0;
      if (a == b || cudaDeviceCanAccessPeer(&can, a, b) != cudaSuccess || !can) continue;
      if (cudaDeviceEnablePeerAccess(b, 0) != cudaSuccess) cudaGetLastError();  // already enabled is fine
      cudaMemPool_t theirs;
      if (cudaDeviceGetDefaultMemPool(&theirs, b) == cudaSuccess) {
        cudaMemAccessDesc access;
        access.location.type = cudaMemLocationTypeDevice;
        access.location.id = a;
        access.flags = cudaMemAccessFlagsProtReadWrite;
        if (cudaMemPoolSetAccess(theirs, &access, 1) != cudaSuccess) cudaGetLastError();
      }
    }
  }
}

}  // namespace
}  // namespace cuda

namespace cuda {
namespace {

// Why there is no usable device, in words that fit the machine: without an NVIDIA driver the
// runtime says "driver version is insufficient", which would send people to upgrade a driver
// they do not need; that message stays for machines that have a GPU.
std::string no_device_reason(cudaError_t rc) {
  struct stat st;
  const bool driver = stat("/proc/driver/nvidia", &st) == 0 || stat("/dev/nvidiactl", &st) == 0;
  if (!driver) return "no NVIDIA driver is loaded on this machine: no /proc/driver/nvidia";
  return rc == cudaSuccess ? "the driver reports 0 devices" : cudaGetErrorString(rc);
}

}  // namespace
}  // namespace cuda

Error probe_cuda(sy_backend_info* info) {
  cuda::configure_driver_environment();
  info->compiled = 1;
  std::strncpy(info->compiled_archs, SY_CUDA_ARCHS, sizeof info->compiled_archs - 1);
  int v = 0;
  if (cudaRuntimeGetVersion(&v) == cudaSuccess) info->cuda_runtime_version = v;
  v = 0;
  if (cudaDriverGetVersion(&v) == cudaSuccess) info->cuda_driver_version = v;
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess || count == 0) {
    info->available = 0;
    const std::string why = "no CUDA device (" + cuda::no_device_reason(rc) + ")";
    std::strncpy(info->reason, why.c_str(), sizeof info->reason - 1);
    cudaGetLastError();  // clear the runtime's sticky last error
    return ok();
  }
  info->available = 1;
  info->device_count = count;
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
    std::string name = std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
    std::strncpy(info->device_name, name.c_str(), sizeof info->device_name - 1);
  }
  info->dispatch_supported = 1;
#if SY_CUDA_ON_CPU
  // Said plainly wherever the device is named: no GPU is involved.
  info->executed_on_cpu = 1;
  std::strncpy(info->device_name, kExecutedOnCpu, sizeof info->device_name - 1);
#endif
  return ok();
}

Error cuda_peer_access(int a, int b, int* can_access, int* native_atomics) {
  int count = 0;
  SY_CUDA(cudaGetDeviceCount(&count));
  if (a < 0 || a >= count || b < 0 || b >= count) {
    return invalid("device", "device: " + std::to_string(a) + " and " + std::to_string(b) + " must be below the " +
                                 std::to_string(count) + " devices present");
  }
  SY_CUDA(cudaDeviceCanAccessPeer(can_access, a, b));
  *native_atomics = 0;
  if (*can_access) SY_CUDA(cudaDeviceGetP2PAttribute(native_atomics, cudaDevP2PAttrNativeAtomicSupported, a, b));
  return ok();
}

std::unique_ptr<Backend> make_cuda_backend(Error* why) {
  cuda::configure_driver_environment();
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess || count == 0) {
    *why = fail(SY_ERROR_NO_DEVICE, "backend: no CUDA device (" + cuda::no_device_reason(rc) + "); use backend \"host\"",
                "backend");
    cudaGetLastError();
    return nullptr;
  }
  cuda::prepare_devices(count);
  return std::make_unique<cuda::CudaBackend>(count);
}

}  // namespace sy
