// The ibverbs NIC engine (verbs_engine.h). libibverbs is opened with dlopen, never linked: the
// library loads where there is no NIC, and says so only when an engine is asked for.
#include "verbs_engine.h"

#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "../cuda_check.h"

#if __has_include(<infiniband/verbs.h>)
#define SY_HAVE_VERBS 1
#include <arpa/inet.h>
#include <dlfcn.h>
#include <infiniband/verbs.h>
#else
#define SY_HAVE_VERBS 0
#endif

namespace sy::cuda::transport {

namespace {

// An environment variable as a bounded integer.
Error env_int(const char* name, int least, int most, int* out) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return ok();
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != 0 || x < least || x > most) {
    return invalid(name, std::string(name) + "=" + v + ": expected an integer from " + std::to_string(least) +
                             " to " + std::to_string(most));
  }
  *out = int(x);
  return ok();
}

}  // namespace

Error VerbsSettings::from_environment(VerbsSettings* out) {
  VerbsSettings s;
  if (const char* v = std::getenv("SWITCHYARD_IBVERBS_LIBRARY"); v != nullptr && *v != 0) s.library = v;
  if (const char* v = std::getenv("SWITCHYARD_IBVERBS_DEVICE"); v != nullptr) s.device = v;
  SY_TRY(env_int("SWITCHYARD_IBVERBS_PORT", 1, 255, &s.port));
  SY_TRY(env_int("SWITCHYARD_IBVERBS_GID_INDEX", 0, 255, &s.gid_index));
  SY_TRY(env_int("SWITCHYARD_IBVERBS_TIMEOUT", 1, 31, &s.timeout));
  if (const char* v = std::getenv("SWITCHYARD_IBVERBS_DMABUF"); v != nullptr && *v != 0) {
    const std::string x = v;
    if (x == "auto") s.dmabuf = VerbsSettings::DmaBuf::Auto;
    else if (x == "1") s.dmabuf = VerbsSettings::DmaBuf::Only;
    else if (x == "0") s.dmabuf = VerbsSettings::DmaBuf::Never;
    else return invalid("SWITCHYARD_IBVERBS_DMABUF", "SWITCHYARD_IBVERBS_DMABUF=" + x + ": expected auto, 1 or 0");
  }
  *out = s;
  return ok();
}

#if SY_HAVE_VERBS

namespace {

// Work requests per queue pair in flight, and receives posted per queue pair for immediates.
constexpr int kSendDepth = 256;
constexpr int kRecvDepth = 128;
// An immediate: the slot in its top 8 bits, the amount in the rest.
constexpr uint32_t kImmAddBits = 24;
constexpr uint64_t kImmMaxAdd = (1u << kImmAddBits) - 1;
// The largest single RDMA write (a larger put goes as several).
constexpr uint64_t kMaxWrite = 1ull << 30;

// What the engine calls, resolved by name (the inline wrappers of verbs.h call the context's ops).
struct Verbs {
  void* handle = nullptr;
  ibv_device** (*get_device_list)(int*) = nullptr;
  void (*free_device_list)(ibv_device**) = nullptr;
  const char* (*get_device_name)(ibv_device*) = nullptr;
  ibv_context* (*open_device)(ibv_device*) = nullptr;
  int (*close_device)(ibv_context*) = nullptr;
  int (*query_port)(ibv_context*, uint8_t, ibv_port_attr*) = nullptr;
  int (*query_gid)(ibv_context*, uint8_t, int, ibv_gid*) = nullptr;
  ibv_pd* (*alloc_pd)(ibv_context*) = nullptr;
  int (*dealloc_pd)(ibv_pd*) = nullptr;
  ibv_mr* (*reg_mr)(ibv_pd*, void*, size_t, int) = nullptr;
  int (*dereg_mr)(ibv_mr*) = nullptr;
  ibv_cq* (*create_cq)(ibv_context*, int, void*, ibv_comp_channel*, int) = nullptr;
  int (*destroy_cq)(ibv_cq*) = nullptr;
  ibv_qp* (*create_qp)(ibv_pd*, ibv_qp_init_attr*) = nullptr;
  int (*modify_qp)(ibv_qp*, ibv_qp_attr*, int) = nullptr;
  int (*destroy_qp)(ibv_qp*) = nullptr;
  const char* (*wc_status_str)(ibv_wc_status) = nullptr;
  // Optional: rdma-core 34 and 32 have them, older ones do not.
  ibv_mr* (*reg_dmabuf_mr)(ibv_pd*, uint64_t, size_t, uint64_t, int, int) = nullptr;
  int (*query_gid_ex)(ibv_context*, uint32_t, uint32_t, ibv_gid_entry*, uint32_t, size_t) = nullptr;
};

// Opens the library once per path; a failure is reported, and tried again on the next call.
Error load_verbs(const std::string& path, const Verbs** out) {
  static std::mutex mu;
  static std::vector<std::pair<std::string, Verbs*>> loaded;  // kept for the process's life
  std::lock_guard<std::mutex> l(mu);
  for (const auto& [p, v] : loaded)
    if (p == path) {
      *out = v;
      return ok();
    }
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    const char* why = dlerror();
    return fail(SY_ERROR_UNSUPPORTED, "ibverbs: cannot open " + path + " (" + (why ? why : "unknown") +
                                          "): install rdma-core's libibverbs, or set SWITCHYARD_IBVERBS_LIBRARY");
  }
  auto v = std::make_unique<Verbs>();
  v->handle = h;
  std::string missing;
  auto get = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
    if (fn == nullptr) missing += std::string(missing.empty() ? "" : ", ") + name;
  };
  get(v->get_device_list, "ibv_get_device_list");
  get(v->free_device_list, "ibv_free_device_list");
  get(v->get_device_name, "ibv_get_device_name");
  get(v->open_device, "ibv_open_device");
  get(v->close_device, "ibv_close_device");
  get(v->query_port, "ibv_query_port");
  get(v->query_gid, "ibv_query_gid");
  get(v->alloc_pd, "ibv_alloc_pd");
  get(v->dealloc_pd, "ibv_dealloc_pd");
  get(v->reg_mr, "ibv_reg_mr");
  get(v->dereg_mr, "ibv_dereg_mr");
  get(v->create_cq, "ibv_create_cq");
  get(v->destroy_cq, "ibv_destroy_cq");
  get(v->create_qp, "ibv_create_qp");
  get(v->modify_qp, "ibv_modify_qp");
  get(v->destroy_qp, "ibv_destroy_qp");
  get(v->wc_status_str, "ibv_wc_status_str");
  v->reg_dmabuf_mr = reinterpret_cast<decltype(v->reg_dmabuf_mr)>(dlsym(h, "ibv_reg_dmabuf_mr"));
  v->query_gid_ex = reinterpret_cast<decltype(v->query_gid_ex)>(dlsym(h, "_ibv_query_gid_ex"));
  if (!missing.empty()) {
    dlclose(h);
    return fail(SY_ERROR_UNSUPPORTED, "ibverbs: " + path + " lacks " + missing);
  }
  loaded.emplace_back(path, v.release());
  *out = loaded.back().second;
  return ok();
}

std::string errno_text(int rc) { return std::string(std::strerror(rc > 0 ? rc : errno)); }

// A GID of an IPv4 address (::ffff:a.b.c.d).
bool ipv4_gid(const ibv_gid& gid) {
  const uint8_t* g = gid.raw;
  return std::all_of(g, g + 10, [](uint8_t b) { return b == 0; }) && g[10] == 0xff && g[11] == 0xff;
}

// RoCE without SWITCHYARD_IBVERBS_GID_INDEX: the port's first RoCE v2 GID of an IPv4 address
// (::ffff:a.b.c.d), else its first of a global IPv6 address, else its first link-local one
// (fe80::/10); GID 0 where the port has no RoCE v2 GID, or rdma-core cannot say a GID's type
// (before 32). Every rank chooses by the same rule; where the hosts' tables differ, a peer's GID of
// the other family is refused when its endpoint is imported.
int roce_gid_index(const Verbs& v, ibv_context* ctx, int port, int table_length) {
  if (v.query_gid_ex == nullptr) return 0;
  int best = -1, best_kind = 3;  // 0: IPv4, 1: global IPv6, 2: link-local
  for (int i = 0; i < table_length && i < 256; ++i) {
    ibv_gid_entry e{};
    if (v.query_gid_ex(ctx, uint32_t(port), uint32_t(i), &e, 0, sizeof e) != 0) continue;  // an empty entry
    if (e.gid_type != IBV_GID_TYPE_ROCE_V2) continue;
    const uint8_t* g = e.gid.raw;
    if (std::all_of(g, g + 16, [](uint8_t b) { return b == 0; })) continue;
    const bool ipv4 = ipv4_gid(e.gid);
    const bool link_local = g[0] == 0xfe && (g[1] & 0xc0) == 0x80;
    const int kind = ipv4 ? 0 : link_local ? 2 : 1;
    if (kind < best_kind) {
      best = i;
      best_kind = kind;
    }
  }
  return best >= 0 ? best : 0;
}

// The RoCE version of the port's GID `index` (1 or 2); 0 where rdma-core cannot say (before 32).
uint8_t roce_version(const Verbs& v, ibv_context* ctx, int port, int index) {
  ibv_gid_entry e{};
  if (v.query_gid_ex == nullptr || v.query_gid_ex(ctx, uint32_t(port), uint32_t(index), &e, 0, sizeof e) != 0) return 0;
  return e.gid_type == IBV_GID_TYPE_ROCE_V2 ? 2 : e.gid_type == IBV_GID_TYPE_ROCE_V1 ? 1 : 0;
}

// Registers `[window, window + bytes)` through a dma-buf of the device allocation it lies in
// (from the allocation's page-aligned start, as the driver exports whole pages); the region's
// addresses stay the window's own (iova = window). "" when registered, else why not.
std::string register_dmabuf(const Verbs& v, ibv_pd* pd, int device, uint8_t* window, uint64_t bytes, int access,
                            ibv_mr** out) {
  if (v.reg_dmabuf_mr == nullptr) return "this libibverbs has no ibv_reg_dmabuf_mr (rdma-core 34 or later has)";
  // The driver calls act on the current device's context: the window's, for as long as they run.
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    (void)cudaGetLastError();
    return "GPU " + std::to_string(device) + " cannot be made current";
  }
  struct Restore {
    int device;
    ~Restore() { (void)cudaSetDevice(device); }
  } restore{previous};
  void* range_fn = nullptr;
  void* handle_fn = nullptr;
  if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &range_fn, 12000, cudaEnableDefault, nullptr) !=
          cudaSuccess ||
      cudaGetDriverEntryPointByVersion("cuMemGetHandleForAddressRange", &handle_fn, 12000, cudaEnableDefault,
                                       nullptr) != cudaSuccess ||
      range_fn == nullptr || handle_fn == nullptr) {
    (void)cudaGetLastError();
    return "the CUDA driver does not export device memory as dma-buf (no cuMemGetHandleForAddressRange)";
  }
  const auto address_range = reinterpret_cast<PFN_cuMemGetAddressRange_v3020>(range_fn);
  const auto handle_for = reinterpret_cast<PFN_cuMemGetHandleForAddressRange_v11070>(handle_fn);
  CUdeviceptr base = 0;
  size_t size = 0;
  if (const CUresult rc = address_range(&base, &size, CUdeviceptr(window)); rc != CUDA_SUCCESS) {
    return "cuMemGetAddressRange failed (CUresult " + std::to_string(int(rc)) + ")";
  }
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  const uint64_t start = base / page * page;
  const uint64_t span = (uint64_t(base) + size - start + page - 1) / page * page;
  int fd = -1;
  if (const CUresult rc = handle_for(&fd, CUdeviceptr(start), size_t(span), CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
      rc != CUDA_SUCCESS) {
    return "cuMemGetHandleForAddressRange failed (CUresult " + std::to_string(int(rc)) +
           "; dma-buf needs NVIDIA's open GPU kernel module)";
  }
  *out = v.reg_dmabuf_mr(pd, uint64_t(window) - start, size_t(bytes), uint64_t(window), fd, access);
  const int err = errno;
  close(fd);  // the registration holds the memory by a reference of its own
  return *out != nullptr ? "" : "ibv_reg_dmabuf_mr failed: " + errno_text(err);
}

}  // namespace

// What a rank publishes for its peers.
struct VerbsEndpoint {
  bool published = false;
  uint16_t lid = 0;
  ibv_gid gid{};
  bool global = false;  // it addresses by GID (RoCE, or a GID index set), else by LID
  uint8_t roce = 0;     // its GID's RoCE version (1 or 2); 0: InfiniBand, or unknown (no _ibv_query_gid_ex)
  uint8_t mtu = 0;    // its port's active MTU (enum ibv_mtu): a path takes the smaller end's
  uint64_t addr = 0;  // its window
  uint32_t rkey = 0;
  uint64_t bytes = 0;
  std::vector<uint32_t> qpn;  // [peer]: the queue pair it made for that peer
};

class VerbsDirectory {
 public:
  explicit VerbsDirectory(int ranks)
      : endpoints_(size_t(ranks)), in_flight_(ranks), ready_(size_t(ranks) * size_t(ranks), 0) {}
  int ranks() const { return int(endpoints_.size()); }
  void publish(int rank, const VerbsEndpoint& e) {
    std::lock_guard<std::mutex> l(mu_);
    endpoints_[size_t(rank)] = e;
    endpoints_[size_t(rank)].published = true;
    version_.fetch_add(1, std::memory_order_release);
  }
  // Refuses new puts to the rank, then waits (at most `timeout_ms`) until the peers' puts in
  // flight to it are done; false if they were not.
  bool withdraw(int rank, int64_t timeout_ms) {
    std::unique_lock<std::mutex> l(mu_);
    endpoints_[size_t(rank)] = {};
    for (int p = 0; p < ranks(); ++p) ready_[size_t(rank) * size_t(ranks()) + size_t(p)] = 0;
    version_.fetch_add(1, std::memory_order_release);
    return in_flight_.wait_none(l, rank, timeout_ms);
  }
  bool lookup(int rank, VerbsEndpoint* out) {
    std::lock_guard<std::mutex> l(mu_);
    if (!endpoints_[size_t(rank)].published) return false;
    *out = endpoints_[size_t(rank)];
    return true;
  }
  uint64_t version() const { return version_.load(std::memory_order_acquire); }
  // One put to `rank`, counted as in flight to it until release(rank); false (nothing counted)
  // if it has withdrawn or never published.
  bool acquire(int rank) {
    std::lock_guard<std::mutex> l(mu_);
    if (!endpoints_[size_t(rank)].published) return false;
    in_flight_.add(rank);
    return true;
  }
  void release(int rank) {
    std::lock_guard<std::mutex> l(mu_);
    in_flight_.done(rank);
  }
  // `rank`'s queue pair for `peer` has reached RTR: what `peer` writes to it is received, not
  // dropped into a retransmission.
  void mark_ready(int rank, int peer) {
    std::lock_guard<std::mutex> l(mu_);
    ready_[size_t(rank) * size_t(ranks()) + size_t(peer)] = 1;
  }
  bool ready(int rank, int peer) {
    std::lock_guard<std::mutex> l(mu_);
    return ready_[size_t(rank) * size_t(ranks()) + size_t(peer)] != 0;
  }

 private:
  std::mutex mu_;
  std::vector<VerbsEndpoint> endpoints_;
  PutsInFlight in_flight_;      // puts accepted to each rank and not yet finished
  std::vector<uint8_t> ready_;  // [rank][peer]
  std::atomic<uint64_t> version_{0};
};

namespace {

class VerbsEngine final : public NicEngine {
 public:
  VerbsEngine(std::shared_ptr<VerbsDirectory> dir, int rank, std::vector<uint8_t> reach, int slots, const Verbs& v)
      : dir_(std::move(dir)), rank_(rank), slots_(slots), v_(v), reach_(std::move(reach)) {}
  ~VerbsEngine() override;

  Error open(int device, uint8_t* window, uint64_t window_bytes, const VerbsSettings& s);

  int ranks() const override { return dir_->ranks(); }
  int slots() const override { return slots_; }
  int rank() const { return rank_; }
  const char* name() const override { return "ibverbs"; }
  Error start(uint64_t* signals) override;
  Refusal accept(NicPut& p, int64_t now_ns) override;
  NicStep issue(NicQueue& q, int64_t now_ns, std::string* error, size_t* failed) override;
  NicStep done(const NicPut& front, int64_t now_ns, std::string* error) override;
  void finish(NicPut& p) override { dir_->release(p.d.peer); }
  void forget(NicPut& p) override { dir_->release(p.d.peer); }
  NicStep progress(std::string* error) override;
  void quiesce() override;
  bool detach(int64_t timeout_ms) override { return dir_->withdraw(rank_, timeout_ms); }

  VerbsEndpoint endpoint() const;
  Error import(int peer, const VerbsEndpoint& e);

 private:
  struct Peer {
    ibv_qp* qp = nullptr;
    bool connected = false;  // this rank's queue pair to it is in RTS
    bool ready = false;      // its queue pair to this rank is in RTR (VerbsDirectory::ready)
    uint64_t remote_addr = 0, remote_bytes = 0;
    uint32_t rkey = 0;
    int in_flight = 0;          // work requests posted whose completions have not been seen
    uint64_t done_through = 0;  // the last ticket completed (tickets complete in order per peer)
    std::string failure;        // a put to it failed: done() reports it for the first put not done
  };
  Error register_window(const std::string& who, int device);
  Error connect(int peer, const VerbsEndpoint& e);
  void connect_published();
  uint64_t work_requests(const NicPut& p) const;
  NicStep post(NicPut& p, std::string* error);
  NicStep poll_sends(std::string* error);
  NicStep poll_receives(std::string* error);
  int peer_of(uint32_t qp_num) const;
  NicStep broken(std::string* error, const std::string& why);
  std::string peer_text(int peer) const { return "rank " + std::to_string(rank_) + " to rank " + std::to_string(peer); }

  std::shared_ptr<VerbsDirectory> dir_;
  int rank_, slots_;
  const Verbs& v_;
  std::vector<uint8_t> reach_;  // [rank]: 1 for the peers this rank puts to (and takes puts from)
  VerbsSettings settings_;
  ibv_context* ctx_ = nullptr;
  ibv_pd* pd_ = nullptr;
  ibv_mr* mr_ = nullptr;
  ibv_cq* send_cq_ = nullptr;
  ibv_cq* recv_cq_ = nullptr;
  ibv_port_attr port_{};
  ibv_gid gid_{};
  int gid_index_ = 0;    // gid_'s (VerbsSettings::gid_index, or chosen)
  uint8_t roce_ = 0;     // gid_'s RoCE version (VerbsEndpoint::roce)
  bool global_ = false;  // address peers by GID (RoCE, or a GID index set)
  uint64_t max_write_ = kMaxWrite;
  uint8_t* window_ = nullptr;
  uint64_t window_bytes_ = 0;
  uint64_t* signals_ = nullptr;
  std::vector<Peer> peers_;
  uint64_t tickets_ = 0;
  uint64_t seen_version_ = 0;
  int unconnected_ = 0;
  bool flush_ = false;         // cudaDeviceFlushGPUDirectRDMAWrites before raising signals
  bool broken_ = false;        // a work request or a connection failed: the queue pairs are unusable
  bool put_failed_ = false;    // ... a put's work request (done() reports it, naming the put)
  bool reported_ = false;      // ... and the proxy has been told
  std::string broken_why_;
};

VerbsEngine::~VerbsEngine() {
  // The proxy's thread has stopped: nothing posts or polls. Destroying the queue pairs and
  // deregistering the window means the NIC no longer reads or writes it.
  (void)dir_->withdraw(rank_, 0);
  for (Peer& p : peers_)
    if (p.qp) (void)v_.destroy_qp(p.qp);
  if (mr_) (void)v_.dereg_mr(mr_);
  if (send_cq_) (void)v_.destroy_cq(send_cq_);
  if (recv_cq_) (void)v_.destroy_cq(recv_cq_);
  if (pd_) (void)v_.dealloc_pd(pd_);
  if (ctx_) (void)v_.close_device(ctx_);
}

Error VerbsEngine::open(int device, uint8_t* window, uint64_t window_bytes, const VerbsSettings& s) {
  settings_ = s;
  window_ = window;
  window_bytes_ = window_bytes;
  const std::string who = "rank " + std::to_string(rank_) + ": ibverbs: ";
  // A signal must not overtake its data into the GPU's view: where the GPU can flush the NIC's
  // writes it does before each batch of signals; where it orders them itself nothing is needed;
  // elsewhere the engine is refused.
  int flush_options = 0, ordering = 0;
  if (cudaDeviceGetAttribute(&flush_options, cudaDevAttrGPUDirectRDMAFlushWritesOptions, device) != cudaSuccess) {
    (void)cudaGetLastError();
    flush_options = 0;
  }
  if (cudaDeviceGetAttribute(&ordering, cudaDevAttrGPUDirectRDMAWritesOrdering, device) != cudaSuccess) {
    (void)cudaGetLastError();
    ordering = 0;
  }
  flush_ = (flush_options & cudaFlushGPUDirectRDMAWritesOptionHost) != 0;
  if (!flush_ && ordering < cudaGPUDirectRDMAWritesOrderingOwner) {
    return fail(SY_ERROR_UNSUPPORTED, who + "GPU " + std::to_string(device) +
                                          " can neither flush GPUDirect RDMA writes nor order them, so a signal "
                                          "could be seen before its data");
  }
  int n = 0;
  ibv_device** list = v_.get_device_list(&n);
  if (list == nullptr || n == 0) {
    if (list) v_.free_device_list(list);
    return fail(SY_ERROR_UNSUPPORTED, who + "no RDMA device (ibv_get_device_list found none)");
  }
  ibv_device* chosen = nullptr;
  std::string names;
  for (int i = 0; i < n; ++i) {
    const char* name = v_.get_device_name(list[i]);
    names += std::string(names.empty() ? "" : ", ") + (name ? name : "?");
    if (chosen == nullptr && (s.device.empty() || (name && s.device == name))) chosen = list[i];
  }
  if (chosen) ctx_ = v_.open_device(chosen);
  v_.free_device_list(list);
  if (chosen == nullptr) {
    return invalid("SWITCHYARD_IBVERBS_DEVICE", who + "no device " + s.device + " (there are " + names + ")");
  }
  if (ctx_ == nullptr) return fail(SY_ERROR_UNSUPPORTED, who + "cannot open the device: " + errno_text(0));
  // The exported ibv_query_port fills the older, shorter struct: the rest stays zero.
  if (int rc = v_.query_port(ctx_, uint8_t(s.port), &port_); rc != 0) {
    return fail(SY_ERROR_UNSUPPORTED, who + "cannot query port " + std::to_string(s.port) + ": " + errno_text(rc));
  }
  if (port_.state != IBV_PORT_ACTIVE) {
    return fail(SY_ERROR_UNSUPPORTED, who + "port " + std::to_string(s.port) + " is not active");
  }
  if (port_.max_msg_sz > 0) max_write_ = std::min<uint64_t>(kMaxWrite, port_.max_msg_sz);
  global_ = s.gid_index >= 0 || port_.link_layer == IBV_LINK_LAYER_ETHERNET;
  if (global_) {
    gid_index_ = s.gid_index >= 0 ? s.gid_index : roce_gid_index(v_, ctx_, s.port, port_.gid_tbl_len);
    if (int rc = v_.query_gid(ctx_, uint8_t(s.port), gid_index_, &gid_); rc != 0) {
      return fail(SY_ERROR_UNSUPPORTED, who + "cannot read GID " + std::to_string(gid_index_) + ": " + errno_text(rc));
    }
    roce_ = port_.link_layer == IBV_LINK_LAYER_ETHERNET ? roce_version(v_, ctx_, s.port, gid_index_) : 0;
  }
  pd_ = v_.alloc_pd(ctx_);
  if (pd_ == nullptr) return fail(SY_ERROR_UNSUPPORTED, who + "cannot allocate a protection domain: " + errno_text(0));
  SY_TRY(register_window(who, device));
  const int R = ranks();
  const int reached = std::max(1, int(std::count(reach_.begin(), reach_.end(), uint8_t(1))));
  send_cq_ = v_.create_cq(ctx_, kSendDepth * reached, nullptr, nullptr, 0);
  recv_cq_ = v_.create_cq(ctx_, kRecvDepth * reached, nullptr, nullptr, 0);
  if (send_cq_ == nullptr || recv_cq_ == nullptr) {
    return fail(SY_ERROR_UNSUPPORTED, who + "cannot create completion queues: " + errno_text(0));
  }
  peers_.resize(size_t(R));
  for (int p = 0; p < R; ++p) {
    if (!reach_[size_t(p)]) continue;
    ibv_qp_init_attr init{};
    init.send_cq = send_cq_;
    init.recv_cq = recv_cq_;
    init.qp_type = IBV_QPT_RC;
    init.sq_sig_all = 1;
    init.cap.max_send_wr = kSendDepth;
    init.cap.max_recv_wr = kRecvDepth;
    init.cap.max_send_sge = 1;
    init.cap.max_recv_sge = 1;
    ibv_qp* qp = v_.create_qp(pd_, &init);
    if (qp == nullptr) return fail(SY_ERROR_UNSUPPORTED, who + "cannot create a queue pair: " + errno_text(0));
    peers_[size_t(p)].qp = qp;
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = uint8_t(s.port);
    a.qp_access_flags = IBV_ACCESS_REMOTE_WRITE;
    if (int rc = v_.modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS); rc != 0) {
      return fail(SY_ERROR_UNSUPPORTED, who + "cannot initialise a queue pair: " + errno_text(rc));
    }
    // Receives of no bytes: each takes one immediate; wr_id names the peer.
    for (int i = 0; i < kRecvDepth; ++i) {
      ibv_recv_wr wr{};
      wr.wr_id = uint64_t(p);
      ibv_recv_wr* bad = nullptr;
      if (int rc = ibv_post_recv(qp, &wr, &bad); rc != 0) {
        return fail(SY_ERROR_UNSUPPORTED, who + "cannot post receives: " + errno_text(rc));
      }
    }
    ++unconnected_;
  }
  return ok();
}

// The window, through dma-buf or as peer memory, as VerbsSettings::dmabuf says (see the top).
Error VerbsEngine::register_window(const std::string& who, int device) {
  const int access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE;
  std::string dmabuf = "not tried (SWITCHYARD_IBVERBS_DMABUF=0)";
  if (settings_.dmabuf != VerbsSettings::DmaBuf::Never) {
    dmabuf = register_dmabuf(v_, pd_, device, window_, window_bytes_, access, &mr_);
    if (mr_ != nullptr) return ok();
  }
  std::string peer_memory = "not tried (SWITCHYARD_IBVERBS_DMABUF=1)";
  if (settings_.dmabuf != VerbsSettings::DmaBuf::Only) {
    mr_ = v_.reg_mr(pd_, window_, window_bytes_, access);
    if (mr_ != nullptr) return ok();
    peer_memory = errno_text(0) + " (GPU memory needs the nvidia-peermem module)";
  }
  return fail(SY_ERROR_UNSUPPORTED, who + "cannot register the " + std::to_string(window_bytes_) +
                                        "-byte window (GPU memory): through dma-buf: " + dmabuf +
                                        "; with ibv_reg_mr: " + peer_memory);
}

VerbsEndpoint VerbsEngine::endpoint() const {
  VerbsEndpoint e;
  e.lid = port_.lid;
  e.gid = gid_;
  e.global = global_;
  e.roce = roce_;
  e.mtu = uint8_t(port_.active_mtu);
  e.addr = reinterpret_cast<uint64_t>(window_);
  e.rkey = mr_->rkey;
  e.bytes = window_bytes_;
  e.qpn.assign(size_t(ranks()), 0);
  for (int p = 0; p < ranks(); ++p)
    if (peers_[size_t(p)].qp) e.qpn[size_t(p)] = peers_[size_t(p)].qp->qp_num;
  return e;
}

Error VerbsEngine::start(uint64_t* signals) {
  signals_ = signals;
  dir_->publish(rank_, endpoint());
  connect_published();
  return ok();
}

// A peer in another process: its endpoint into the directory, the queue pair to it connected
// now, and marked ready (it connects its own when it imports this rank's, before the group's
// barrier that precedes every operation).
Error VerbsEngine::import(int peer, const VerbsEndpoint& e) {
  const std::string who = "rank " + std::to_string(rank_) + ": ibverbs: rank " + std::to_string(peer) + "'s endpoint ";
  if (peer < 0 || peer >= ranks() || peer == rank_) return invalid("share.rank", who + "is not a peer's");
  if (peers_[size_t(peer)].connected) return invalid("share.rank", who + "was imported already");
  if (e.qpn.size() != size_t(ranks()) || (e.qpn[size_t(rank_)] == 0) == bool(reach_[size_t(peer)])) {
    return invalid("share.networkEndpoint", who + (reach_[size_t(peer)] ? "has no queue pair for this rank"
                                                                        : "has a queue pair for this rank, which puts "
                                                                          "nothing to it (do the ranks agree on the "
                                                                          "nodes?)"));
  }
  bool numbers_ok = e.qpn[size_t(peer)] == 0;  // no queue pair to itself
  for (uint32_t q : e.qpn) numbers_ok = numbers_ok && q <= 0xFFFFFF;
  if (!numbers_ok) return invalid("share.networkEndpoint", who + "names queue pairs that cannot be (24 bits, none to itself)");
  // A rank this one does not reach (of its own node, say) is never connected to: its NIC, port
  // and window may differ from this rank's (another rail).
  if (!reach_[size_t(peer)]) return ok();
  if (e.bytes != window_bytes_) {
    return invalid("share.networkEndpoint", who + "registers a window of " + std::to_string(e.bytes) +
                                                " bytes, this rank's has " + std::to_string(window_bytes_));
  }
  if (e.mtu < IBV_MTU_256 || e.mtu > IBV_MTU_4096) return invalid("share.networkEndpoint", who + "has no valid MTU");
  if (e.global != global_) {
    return invalid("share.networkEndpoint", who + "addresses by " + (e.global ? "GID" : "LID") + ", this rank by " +
                                                (global_ ? "GID" : "LID") +
                                                ": every process must see the same link layer and SWITCHYARD_IBVERBS_GID_INDEX");
  }
  bool gid_set = false;
  for (uint8_t x : e.gid.raw) gid_set = gid_set || x != 0;
  if (e.global ? !gid_set : e.lid == 0) {
    return invalid("share.networkEndpoint", who + "has no " + (e.global ? "GID" : "LID"));
  }
  if (e.global && e.roce != 0 && roce_ != 0 && e.roce != roce_) {
    // RoCE v1 and v2 packets are framed differently: the queue pair would connect and every put
    // would fail at the transport timeout.
    return invalid("share.networkEndpoint",
                   who + "is a RoCE v" + std::to_string(e.roce) + " GID, this rank's (GID " +
                       std::to_string(gid_index_) + ") a RoCE v" + std::to_string(roce_) +
                       " one: set SWITCHYARD_IBVERBS_GID_INDEX alike on every host, to a RoCE v2 GID (`doctor` lists "
                       "them; RoCE v1 crosses no IP router)");
  }
  if (e.global && ipv4_gid(e.gid) != ipv4_gid(gid_)) {
    // RoCE v2 carries no packet between an IPv4 and an IPv6 address; the queue pair would connect
    // and every put would fail at the transport timeout.
    return invalid("share.networkEndpoint",
                   who + "is a GID of an " + (ipv4_gid(e.gid) ? "IPv4" : "IPv6") + " address, this rank's (GID " +
                       std::to_string(gid_index_) + ") of an " + (ipv4_gid(gid_) ? "IPv4" : "IPv6") +
                       " one: give every host's RoCE interface an address of one family, or set "
                       "SWITCHYARD_IBVERBS_GID_INDEX");
  }
  // Connected before it is published: an endpoint the NIC refuses leaves this engine as it was
  // (the queue pair stays in INIT), usable with the other peers and with a right endpoint later.
  if (Error err = connect(peer, e)) {
    return invalid("share.networkEndpoint", who + "cannot be connected to: " + err.message);
  }
  dir_->publish(peer, e);
  dir_->mark_ready(peer, rank_);
  return ok();
}

// RTR then RTS towards the peer's queue pair for this rank.
Error VerbsEngine::connect(int peer, const VerbsEndpoint& e) {
  Peer& p = peers_[size_t(peer)];
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = ibv_mtu(std::min<int>(port_.active_mtu, e.mtu));
  a.dest_qp_num = e.qpn[size_t(rank_)];
  a.rq_psn = 0;
  a.max_dest_rd_atomic = 1;
  a.min_rnr_timer = 12;
  a.ah_attr.port_num = uint8_t(settings_.port);
  a.ah_attr.dlid = e.lid;
  if (global_) {
    a.ah_attr.is_global = 1;
    a.ah_attr.grh.dgid = e.gid;
    a.ah_attr.grh.sgid_index = uint8_t(gid_index_);
    a.ah_attr.grh.hop_limit = 255;
  }
  if (int rc = v_.modify_qp(p.qp, &a,
                            IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                                IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
      rc != 0) {
    return fail(SY_ERROR_UNSUPPORTED, peer_text(peer) + ": ibverbs: the queue pair cannot reach RTR: " + errno_text(rc));
  }
  dir_->mark_ready(rank_, peer);
  ibv_qp_attr b{};
  b.qp_state = IBV_QPS_RTS;
  b.timeout = uint8_t(settings_.timeout);
  b.retry_cnt = 7;
  b.rnr_retry = 7;  // a receiver out of posted receives is waited for, never a failure
  b.sq_psn = 0;
  b.max_rd_atomic = 1;
  if (int rc = v_.modify_qp(p.qp, &b,
                            IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                                IBV_QP_MAX_QP_RD_ATOMIC);
      rc != 0) {
    return fail(SY_ERROR_UNSUPPORTED, peer_text(peer) + ": ibverbs: the queue pair cannot reach RTS: " + errno_text(rc));
  }
  p.remote_addr = e.addr;
  p.remote_bytes = e.bytes;
  p.rkey = e.rkey;
  p.connected = true;
  --unconnected_;
  return ok();
}

// Connects to every peer that has published since the last look. A peer's queue pair towards
// this rank may still be in INIT then: puts to it wait until it is ready (issue), rather than
// be dropped and retransmitted after an ACK timeout.
void VerbsEngine::connect_published() {
  if (unconnected_ == 0 || broken_) return;
  const uint64_t version = dir_->version();
  if (version == seen_version_) return;
  seen_version_ = version;
  for (int p = 0; p < ranks(); ++p) {
    if (!reach_[size_t(p)] || peers_[size_t(p)].connected) continue;
    VerbsEndpoint e;
    if (!dir_->lookup(p, &e) || e.qpn.size() != size_t(ranks())) continue;
    if (Error err = connect(p, e)) {  // the next progress() reports it
      broken_ = true;
      broken_why_ = err.message;
      return;
    }
  }
}

// The work requests a put takes: its bytes in writes of at most max_write_, the last carrying
// the first immediate; an add of 2^24 or more needs more immediates (zero-byte writes).
uint64_t VerbsEngine::work_requests(const NicPut& f) const {
  const uint64_t writes = f.d.op == uint32_t(RdmaOp::Signal) ? 0 : f.d.bytes / max_write_ + (f.d.bytes % max_write_ != 0);
  const uint64_t add = f.d.op == uint32_t(RdmaOp::Put) ? 0 : f.d.signal_add;
  const uint64_t imms = add / kImmMaxAdd + (add % kImmMaxAdd != 0);
  const uint64_t n = writes + imms - (writes > 0 && imms > 0 ? 1 : 0);
  return n > 0 ? n : 1;
}

Refusal VerbsEngine::accept(NicPut& p, int64_t) {
  const RdmaDescriptor& d = p.d;
  // Queue pairs only to the ranks it reaches (never itself: its own puts do not cross the network).
  const bool peer_ok = d.peer >= 0 && d.peer < ranks() && reach_[size_t(d.peer)];
  if (peer_ok) connect_published();
  const bool attached = peer_ok && peers_[size_t(d.peer)].connected && dir_->acquire(d.peer);
  const Refusal why =
      check_descriptor(d, ranks(), slots_, window_bytes_, attached, attached ? peers_[size_t(d.peer)].remote_bytes : 0);
  const Refusal refused = why == Refusal::None && work_requests(p) > uint64_t(kSendDepth) ? Refusal::Size : why;
  if (refused != Refusal::None) {
    if (attached) dir_->release(d.peer);
    return !peer_ok && refused == Refusal::PeerWindow ? Refusal::Peer : refused;
  }
  if (d.op == uint32_t(RdmaOp::Signal)) p.d.bytes = 0;
  return Refusal::None;
}

// Posts one put as a chain of writes, the last carrying (the first part of) the signal.
NicStep VerbsEngine::post(NicPut& f, std::string* error) {
  Peer& peer = peers_[size_t(f.d.peer)];
  const size_t n = size_t(work_requests(f));
  std::vector<ibv_send_wr> wrs(n);
  std::vector<ibv_sge> sges(n);
  uint64_t offset = 0, add_left = f.d.op == uint32_t(RdmaOp::Put) ? 0 : f.d.signal_add;
  const uint64_t ticket = ++tickets_;
  for (size_t i = 0; i < n; ++i) {
    ibv_send_wr& wr = wrs[i];
    const uint64_t bytes = std::min(max_write_, f.d.bytes - offset);
    if (bytes > 0) {
      sges[i].addr = reinterpret_cast<uint64_t>(window_ + f.d.src_offset + offset);
      sges[i].length = uint32_t(bytes);
      sges[i].lkey = mr_->lkey;
      wr.sg_list = &sges[i];
      wr.num_sge = 1;
    }
    // A write of no bytes addresses no memory (a Signal's offsets are not checked): the window's start.
    wr.wr.rdma.remote_addr = bytes > 0 ? peer.remote_addr + f.d.dst_offset + offset : peer.remote_addr;
    wr.wr.rdma.rkey = peer.rkey;
    offset += bytes;
    if (offset == f.d.bytes && (add_left > 0 || (f.d.op != uint32_t(RdmaOp::Put) && i == n - 1))) {
      const uint64_t add = std::min(add_left, kImmMaxAdd);
      add_left -= add;
      wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
      wr.imm_data = htonl(uint32_t(f.d.signal) << kImmAddBits | uint32_t(add));
    } else {
      wr.opcode = IBV_WR_RDMA_WRITE;
    }
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr_id = i == n - 1 ? ticket : 0;
    wr.next = i + 1 < n ? &wrs[i + 1] : nullptr;
  }
  ibv_send_wr* bad = nullptr;
  if (int rc = ibv_post_send(peer.qp, wrs.data(), &bad); rc != 0) {
    // The requests before `bad` went: their completions are still to come.
    for (const ibv_send_wr* w = wrs.data(); w != nullptr && w != bad; w = w->next) ++peer.in_flight;
    *error = ": " + peer_text(f.d.peer) + ": ibverbs: posting the put failed: " + errno_text(rc);
    broken_ = true;
    return NicStep::Failed;
  }
  peer.in_flight += int(n);
  f.ticket = ticket;
  f.issued = true;
  return NicStep::Moved;
}

NicStep VerbsEngine::issue(NicQueue& q, int64_t, std::string* error, size_t* failed) {
  // A put failed and done() has not reported it yet, or a connection failed and progress() has
  // not: nothing more goes, and the failure is reported against that put, or none (a put about
  // to go may be to a rank that is well).
  if (broken_ && !reported_) return NicStep::Idle;
  bool any = false;
  for (size_t i = 0; i < q.size(); ++i) {
    NicPut& f = q[i];
    if (f.issued) continue;
    *failed = i;
    if (broken_) {
      *error = ": " + (broken_why_.empty() ? peer_text(f.d.peer) + ": ibverbs: the queue pairs failed earlier" : broken_why_) +
               "; the buffer must be made again";
      return NicStep::Failed;
    }
    Peer& peer = peers_[size_t(f.d.peer)];
    if (!peer.ready && !(peer.ready = dir_->ready(f.d.peer, rank_))) break;  // puts go in order: the rest wait too
    if (peer.in_flight + int(work_requests(f)) > kSendDepth) break;
    if (post(f, error) == NicStep::Failed) return NicStep::Failed;
    any = true;
  }
  return any ? NicStep::Moved : NicStep::Idle;
}

int VerbsEngine::peer_of(uint32_t qp_num) const {
  for (int p = 0; p < ranks(); ++p)
    if (peers_[size_t(p)].qp && peers_[size_t(p)].qp->qp_num == qp_num) return p;
  return -1;
}

NicStep VerbsEngine::broken(std::string* error, const std::string& why) {
  broken_ = true;
  if (broken_why_.empty()) broken_why_ = why;
  *error = ": " + why;
  reported_ = true;
  return NicStep::Failed;
}

// Every completion is counted; a failed one marks its peer (done() reports it against the first
// put to that peer not done: the one that failed, the rest are flushed after it).
NicStep VerbsEngine::poll_sends(std::string* error) {
  ibv_wc wc[32];
  bool any = false;
  for (;;) {
    const int got = ibv_poll_cq(send_cq_, 32, wc);
    if (got < 0) return broken(error, "rank " + std::to_string(rank_) + ": ibverbs: polling the send completions failed");
    for (int i = 0; i < got; ++i) {
      const int peer = peer_of(wc[i].qp_num);
      if (peer < 0) continue;  // not ours (cannot happen: the queue is this engine's)
      Peer& pr = peers_[size_t(peer)];
      --pr.in_flight;
      any = true;
      if (wc[i].status != IBV_WC_SUCCESS) {
        if (pr.failure.empty()) {
          pr.failure = peer_text(peer) + ": ibverbs: a put failed: " + v_.wc_status_str(wc[i].status) + " (status " +
                       std::to_string(int(wc[i].status)) + ")";
        }
        broken_ = put_failed_ = true;
        if (broken_why_.empty()) broken_why_ = pr.failure;
        continue;
      }
      if (wc[i].wr_id != 0) pr.done_through = wc[i].wr_id;
    }
    if (got < 32) break;
  }
  return any ? NicStep::Moved : NicStep::Idle;
}

// The peers' immediates, into this rank's signals: after a GPUDirect flush, so that the bytes
// they follow are visible to this rank's kernels first.
NicStep VerbsEngine::poll_receives(std::string* error) {
  ibv_wc wc[32];
  bool any = false;
  for (;;) {
    const int got = ibv_poll_cq(recv_cq_, 32, wc);
    if (got < 0) return broken(error, "rank " + std::to_string(rank_) + ": ibverbs: polling the receive completions failed");
    if (got == 0) break;
    if (flush_ && cudaDeviceFlushGPUDirectRDMAWrites(cudaFlushGPUDirectRDMAWritesTargetCurrentDevice,
                                                     cudaFlushGPUDirectRDMAWritesToOwner) != cudaSuccess) {
      (void)cudaGetLastError();
      return broken(error, "rank " + std::to_string(rank_) + ": the GPUDirect flush before raising signals failed");
    }
    for (int i = 0; i < got; ++i) {
      const int peer = int(wc[i].wr_id);
      if (wc[i].status != IBV_WC_SUCCESS) {
        const bool flushed = wc[i].status == IBV_WC_WR_FLUSH_ERR;
        if (flushed && put_failed_) continue;  // the queue pair's put failed: that is reported
        return broken(error, "rank " + std::to_string(peer) + " to rank " + std::to_string(rank_) + ": ibverbs: " +
                                 (flushed ? "the queue pair went to the error state (its receives were flushed)"
                                          : std::string("a receive failed: ") + v_.wc_status_str(wc[i].status)));
      }
      const uint32_t imm = ntohl(wc[i].imm_data);
      const uint32_t slot = imm >> kImmAddBits;
      if (peer < 0 || peer >= ranks() || peer == rank_ || !(wc[i].wc_flags & IBV_WC_WITH_IMM) ||
          slot >= uint32_t(slots_)) {
        return broken(error, "rank " + std::to_string(rank_) + ": ibverbs: rank " + std::to_string(peer) +
                                 " sent an immediate for no signal (slot " + std::to_string(slot) + ")");
      }
      __atomic_fetch_add(&signals_[signal_index(peer, int(slot), slots_)], uint64_t(imm & kImmMaxAdd),
                         __ATOMIC_RELEASE);
      ibv_recv_wr wr{};
      wr.wr_id = uint64_t(peer);
      ibv_recv_wr* bad = nullptr;
      if (int rc = ibv_post_recv(peers_[size_t(peer)].qp, &wr, &bad); rc != 0) {
        return broken(error, "rank " + std::to_string(rank_) + ": ibverbs: reposting a receive failed: " + errno_text(rc));
      }
      any = true;
    }
    if (got < 32) break;
  }
  return any ? NicStep::Moved : NicStep::Idle;
}

NicStep VerbsEngine::progress(std::string* error) {
  connect_published();
  // Sends first: a failed put moves its queue pair to the error state, which flushes the pair's
  // receives too, and the put's failure is the cause worth reporting.
  const NicStep s = poll_sends(error);
  if (s == NicStep::Failed) return s;
  const NicStep r = poll_receives(error);
  if (r == NicStep::Failed) return r;
  if (broken_ && !put_failed_ && !reported_) {  // a connection failed: no put to blame
    reported_ = true;
    *error = ": " + broken_why_;
    return NicStep::Failed;
  }
  return r == NicStep::Moved || s == NicStep::Moved ? NicStep::Moved : NicStep::Idle;
}

NicStep VerbsEngine::done(const NicPut& f, int64_t, std::string* error) {
  const Peer& p = peers_[size_t(f.d.peer)];
  if (p.done_through >= f.ticket) return NicStep::Moved;
  if (p.failure.empty()) return NicStep::Idle;
  reported_ = true;
  *error = ": " + p.failure;
  return NicStep::Failed;
}

// The queue pairs to the error state: the NIC flushes what they hold, and the engine waits (5 s
// at most) for those completions, after which nothing it posted reads or writes memory.
void VerbsEngine::quiesce() {
  broken_ = true;
  reported_ = true;  // what it started is dropped: nothing is left to report a late failure against
  if (broken_why_.empty()) broken_why_ = "rank " + std::to_string(rank_) + ": ibverbs: the queue pairs were stopped";
  for (Peer& p : peers_) {
    if (!p.qp) continue;
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_ERR;
    (void)v_.modify_qp(p.qp, &a, IBV_QP_STATE);
  }
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  ibv_wc wc[32];
  for (;;) {
    int left = 0;
    for (const Peer& p : peers_) left += p.in_flight;
    if (left == 0 || std::chrono::steady_clock::now() > give_up) break;
    const int got = ibv_poll_cq(send_cq_, 32, wc);
    if (got < 0) break;
    for (int i = 0; i < got; ++i)
      if (const int peer = peer_of(wc[i].qp_num); peer >= 0) --peers_[size_t(peer)].in_flight;
    if (got == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// An endpoint as text: hex of a little-endian record ("SYVB", version 2, then the fields in the
// order below, then one queue-pair number per rank).
constexpr uint32_t kEndpointMagic = 0x42565953;  // "SYVB"
constexpr size_t kEndpointHeader = 56;
constexpr uint32_t kEndpointVersion = 2;  // 2: the GID's RoCE version at byte 18

void put_le(std::vector<uint8_t>& b, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) b.push_back(uint8_t(v >> (8 * i)));
}
uint64_t get_le(const std::vector<uint8_t>& b, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(b[at + size_t(i)]) << (8 * i);
  return v;
}

std::string encode_endpoint(int rank, int ranks, const VerbsEndpoint& e) {
  std::vector<uint8_t> b;
  put_le(b, kEndpointMagic, 4);
  put_le(b, kEndpointVersion, 2);
  put_le(b, e.mtu, 1);
  put_le(b, e.global ? 1 : 0, 1);
  put_le(b, uint32_t(rank), 4);
  put_le(b, uint32_t(ranks), 4);
  put_le(b, e.lid, 2);
  put_le(b, e.roce, 1);
  put_le(b, 0, 1);
  put_le(b, e.rkey, 4);
  for (uint8_t x : e.gid.raw) b.push_back(x);
  put_le(b, e.addr, 8);
  put_le(b, e.bytes, 8);
  for (uint32_t q : e.qpn) put_le(b, q, 4);
  static const char* digits = "0123456789abcdef";
  std::string hex;
  for (uint8_t x : b) {
    hex.push_back(digits[x >> 4]);
    hex.push_back(digits[x & 15]);
  }
  return hex;
}

Error decode_endpoint(const std::string& hex, int peer, int ranks, VerbsEndpoint* out) {
  const std::string who = "share.networkEndpoint: rank " + std::to_string(peer) + "'s ibverbs endpoint ";
  const size_t expected = kEndpointHeader + 4 * size_t(ranks);
  if (hex.empty()) {
    return invalid("share.networkEndpoint", who + "is missing: every process must set SWITCHYARD_NIC=ibverbs alike");
  }
  if (hex.size() != 2 * expected) {
    return invalid("share.networkEndpoint", who + "has " + std::to_string(hex.size() / 2) + " bytes, not " +
                                                std::to_string(expected) + " (a group of " + std::to_string(ranks) +
                                                " ranks)");
  }
  std::vector<uint8_t> b(expected);
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < expected; ++i) {
    const int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return invalid("share.networkEndpoint", who + "is not lowercase hex");
    b[i] = uint8_t(hi << 4 | lo);
  }
  if (get_le(b, 0, 4) != kEndpointMagic || get_le(b, 4, 2) != kEndpointVersion) {
    return invalid("share.networkEndpoint", who + "is not one this library writes (magic or version)");
  }
  if (int64_t(int32_t(get_le(b, 8, 4))) != peer || int64_t(int32_t(get_le(b, 12, 4))) != ranks) {
    return invalid("share.networkEndpoint", who + "names another rank or group size");
  }
  if (get_le(b, 18, 1) > 2) return invalid("share.networkEndpoint", who + "names no RoCE version");
  if (get_le(b, 19, 1) != 0) return invalid("share.networkEndpoint", who + "has reserved bytes set");
  VerbsEndpoint e;
  e.mtu = uint8_t(get_le(b, 6, 1));
  e.global = get_le(b, 7, 1) != 0;
  e.lid = uint16_t(get_le(b, 16, 2));
  e.roce = uint8_t(get_le(b, 18, 1));
  e.rkey = uint32_t(get_le(b, 20, 4));
  std::memcpy(e.gid.raw, b.data() + 24, 16);
  e.addr = get_le(b, 40, 8);
  e.bytes = get_le(b, 48, 8);
  e.qpn.resize(size_t(ranks));
  for (int r = 0; r < ranks; ++r) e.qpn[size_t(r)] = uint32_t(get_le(b, kEndpointHeader + 4 * size_t(r), 4));
  *out = std::move(e);
  return ok();
}

}  // namespace

bool verbs_compiled() { return true; }

std::shared_ptr<VerbsDirectory> make_verbs_directory(int ranks) { return std::make_shared<VerbsDirectory>(ranks); }

Error create_verbs_engine(const std::shared_ptr<VerbsDirectory>& directory, int rank, const std::vector<int>& peers,
                          int slots, int device, uint8_t* window, uint64_t window_bytes, const VerbsSettings& settings,
                          std::unique_ptr<NicEngine>* out) {
  if (!directory || rank < 0 || rank >= directory->ranks()) return invalid("rank", "the engine's rank is not in the directory");
  std::vector<uint8_t> reach(size_t(directory->ranks()), peers.empty() ? 1 : 0);
  for (int p : peers) {
    if (p < 0 || p >= directory->ranks()) return invalid("peers", "the engine's peers are not ranks of the directory");
    reach[size_t(p)] = 1;
  }
  reach[size_t(rank)] = 0;
  if (window == nullptr || window_bytes == 0) return invalid("window", "a proxy needs its rank's window");
  if (slots < 1 || slots > 255) return invalid("slots", "ibverbs immediates carry up to 255 signal slots");
  const Verbs* v = nullptr;
  if (Error e = load_verbs(settings.library, &v)) {
    e.message = "rank " + std::to_string(rank) + ": " + e.message;
    return e;
  }
  auto e = std::make_unique<VerbsEngine>(directory, rank, std::move(reach), slots, *v);
  SY_TRY(e->open(device, window, window_bytes, settings));
  *out = std::move(e);
  return ok();
}

Error verbs_endpoint_text(NicEngine& engine, std::string* out) {
  auto* e = dynamic_cast<VerbsEngine*>(&engine);
  if (e == nullptr) return fail(SY_ERROR_INTERNAL, "verbs_endpoint_text: not an ibverbs engine");
  *out = encode_endpoint(e->rank(), e->ranks(), e->endpoint());
  return ok();
}

Error verbs_import_endpoint(NicEngine& engine, int peer, const std::string& text) {
  auto* e = dynamic_cast<VerbsEngine*>(&engine);
  if (e == nullptr) return fail(SY_ERROR_INTERNAL, "verbs_import_endpoint: not an ibverbs engine");
  if (peer < 0 || peer >= e->ranks()) return invalid("share.rank", "share.rank: not a rank of the group");
  VerbsEndpoint ep;
  SY_TRY(decode_endpoint(text, peer, e->ranks(), &ep));
  return e->import(peer, ep);
}

#else  // !SY_HAVE_VERBS

class VerbsDirectory {};

bool verbs_compiled() { return false; }

std::shared_ptr<VerbsDirectory> make_verbs_directory(int) { return std::make_shared<VerbsDirectory>(); }

Error create_verbs_engine(const std::shared_ptr<VerbsDirectory>&, int, const std::vector<int>&, int, int, uint8_t*,
                          uint64_t, const VerbsSettings&, std::unique_ptr<NicEngine>*) {
  return fail(SY_ERROR_UNSUPPORTED,
              "ibverbs: this library was built without the ibverbs headers (bash .ci/fetch-headers.sh, then rebuild)");
}

Error verbs_endpoint_text(NicEngine&, std::string*) { return fail(SY_ERROR_INTERNAL, "no ibverbs engine"); }
Error verbs_import_endpoint(NicEngine&, int, const std::string&) { return fail(SY_ERROR_INTERNAL, "no ibverbs engine"); }

#endif

}  // namespace sy::cuda::transport
