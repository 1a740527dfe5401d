// The library's object model, shared by both backends: groups of ranks, memory, tensors,
// streams, events, communication buffers and dispatch handles.
//
// Ownership: a GroupCore owns its ranks and its backend. Every other object keeps the group
// alive through a shared_ptr, so nothing refers to a freed rank. Work queued on a stream holds
// shared_ptrs to the tensors it touches; destroying a handle early never frees memory in use.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../core/dtype.h"
#include "../core/link_model.h"
#include "../core/plan.h"
#include "error.h"
#include "switchyard.h"

namespace sy {

class Backend;
struct GroupCore;
struct LLWork;

// Bytes owned by a backend (host or device); released when the last user lets go.
struct Memory {
  void* ptr = nullptr;
  uint64_t bytes = 0;
  int device = -1;  // cuda device, -1 = host memory
  std::string share_name;  // how other processes map it (shm name, CUDA IPC handle), if shared
  // Memory shared with it under the same name, and kept as long as it (the CUDA backend's two hops
  // between processes: the rank's proxy signals, in a shared segment).
  std::shared_ptr<Memory> companion;
  std::function<void(void*)> release;
  Memory() = default;
  Memory(const Memory&) = delete;
  Memory& operator=(const Memory&) = delete;
  ~Memory() {
    if (release && ptr) release(ptr);
  }
};

// The outcome of one operation. Its tasks record their failure here; its outputs and its
// completion event report it to whoever consumes them, every time, and nothing else inherits it.
struct OpStatus {
  std::mutex mu;
  Error error;
  // Evaluated once, after the work completed (e.g. reading a kernel's problem record).
  std::function<Error()> check_after;
  // Set while part of the operation is not even queued yet (a receive hook not run).
  Error unfinished;
  void fail(const Error& e) {
    std::lock_guard<std::mutex> l(mu);
    if (error.ok()) error = e;
  }
  // The failure, if any. Call only once the operation's work has completed.
  Error result() {
    std::lock_guard<std::mutex> l(mu);
    if (unfinished) return unfinished;
    if (check_after) {
      Error e = check_after();
      check_after = nullptr;
      if (e && error.ok()) error = e;
    }
    return error;
  }
};

// A tensor that views part of a communication buffer stays usable only until a later operation
// takes that part over; the guard says until when (see check_view in validate.h).
struct ViewGuard {
  std::shared_ptr<const std::atomic<uint32_t>> use;  // number of the last call that took the memory
  uint32_t valid_through = 0;                          // usable while *use <= this
  std::shared_ptr<const std::atomic<bool>> voided;     // set when the call it was meant for went elsewhere
  std::shared_ptr<const std::atomic<bool>> consumed;   // set once its combine is queued: no more writes
  std::string what;
};

// How much of an output its operation writes (Backend::allocate_output).
enum class OutputWritten : uint8_t { Entirely, Partly };

struct Tensor {
  std::shared_ptr<GroupCore> group;
  std::shared_ptr<ViewGuard> guard;      // set for views into a buffer
  std::shared_ptr<OpStatus> producer;    // the operation that fills it, if any
  bool read_only = false;                // a view of state the library relies on (handle tensors)
  int rank = -1;
  core::DType dtype = core::DType::Invalid;
  int ndim = 0;
  int64_t shape[SY_MAX_DIMS] = {};
  int64_t strides[SY_MAX_DIMS] = {};  // elements
  std::shared_ptr<Memory> memory;
  uint64_t offset_bytes = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  int element_size() const { return core::dtype_size(dtype); }
  uint64_t dense_bytes() const { return uint64_t(numel()) * uint64_t(element_size()); }
  bool is_dense() const {
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  uint8_t* data() const { return static_cast<uint8_t*>(memory->ptr) + offset_bytes; }
  // Byte address of element (i, j) (j ignored for 1-D tensors).
  uint8_t* element(int64_t i, int64_t j = 0) const {
    int64_t off = i * strides[0] + (ndim > 1 ? j * strides[1] : 0);
    return data() + off * element_size();
  }
  // Byte address of the element at `idx` (leading dimensions; the rest are 0).
  uint8_t* element_at(std::initializer_list<int64_t> idx) const {
    int64_t off = 0;
    int d = 0;
    for (int64_t i : idx) off += i * strides[d++];
    return data() + off * element_size();
  }
  // Address of element (i, j) of a 2-D tensor / element i of a 1-D tensor.
  template <class T>
  T* at(int64_t i, int64_t j = 0) const {
    return reinterpret_cast<T*>(data()) + i * strides[0] + (ndim > 1 ? j * strides[1] : 0);
  }
};

// Dense row-major strides for `shape`.
void dense_strides(int ndim, const int64_t* shape, int64_t* strides);

class Event;

class Stream {
 public:
  Stream(std::shared_ptr<GroupCore> g, int r) : group(std::move(g)), rank(r) {}
  virtual ~Stream() = default;
  virtual Error wait_event(Event& event) = 0;
  // Runs until the work enqueued so far is done; returns and clears the first failure of it.
  virtual Error synchronize(Deadline deadline) = 0;
  // The backend's own stream object (cudaStream_t), or nullptr when there is none.
  virtual void* native() const { return nullptr; }
  std::shared_ptr<GroupCore> group;
  int rank;
};

class Event {
 public:
  Event(std::shared_ptr<GroupCore> g, int r) : group(std::move(g)), rank(r) {}
  virtual ~Event() = default;
  // Captures the stream's work so far; with `status`, the event also reports that operation's
  // failure once complete.
  virtual Error record(Stream& stream, std::shared_ptr<OpStatus> status = nullptr) = 0;
  virtual Error query() = 0;  // SY_OK, SY_NOT_READY, or the failure it carries
  virtual Error synchronize(Deadline deadline) = 0;
  // Milliseconds from this event's completion to `end`'s (same backend and rank, both recorded:
  // the caller checks); SY_NOT_READY while either is pending.
  virtual Error elapsed_ms(Event& end, double* ms) = 0;
  std::shared_ptr<GroupCore> group;
  int rank;
};

struct RankCore {
  GroupCore* group = nullptr;  // owner; a RankCore never outlives it
  int index = 0;
  int device = -1;
  int buffers_created = 0;      // the n-th buffer of each rank joins set n
  std::shared_ptr<void> backend_state;
};

// The buffers of all ranks that were created n-th: one collective communicator.
struct BufferSet {
  explicit BufferSet(int ranks) : bases(ranks, nullptr), regions(ranks), joined(0), network(size_t(ranks)) {}
  core::BufferPlan plan;
  bool masking = false;   // what the first member chose; every member must agree
  int64_t timeout_ms = 0;
  std::vector<uint8_t*> bases;                  // peer-visible base of each rank's buffer
  std::vector<std::shared_ptr<Memory>> regions; // keeps every member's region alive
  int joined;
  std::mutex mu;
  std::condition_variable cv;
  // What each rank of this process has put on the network hop (the emulated NIC counts).
  using NetworkCounters = core::NetworkCounters;
  std::vector<NetworkCounters> network;
  // The emulated NIC's link (the group's): bytes per second (0: memory speed) and latency.
  core::LinkModel nic;
  // The backend's, shared by the set's members (CUDA: the emulated NIC's fabric); under mu.
  std::shared_ptr<void> backend_state;
};

struct GroupCore {
  sy_backend backend_kind = SY_BACKEND_HOST;
  std::unique_ptr<Backend> backend;
  int num_ranks = 0;
  // Nodes: ranks [n * ranks_per_node, (n + 1) * ranks_per_node) form node n (core/routing.h).
  int ranks_per_node = 1;
  // The emulated NIC's link model (host backend, across nodes): 0, 0 = memory speed.
  double nic_bytes_per_second = 0;
  int64_t nic_latency_ns = 0;
  int64_t timeout_ms = 0;
  // One rank per process (the peers live in other processes and share buffers by name), or
  // every rank in this process (virtual ranks).
  bool process_group = false;
  int local_rank = 0, local_world_size = 1;  // process groups: this process's place on its node
  std::vector<std::unique_ptr<RankCore>> ranks;  // the ranks living in this process
  RankCore* rank_by_index(int index) const {
    for (const auto& r : ranks)
      if (r->index == index) return r.get();
    return nullptr;
  }
  std::mutex sets_mu;
  std::vector<std::weak_ptr<BufferSet>> sets;
  // The group's NCCL communicator (process groups on the CUDA backend), the library it came from
  // (a nccl::Library, which is never unloaded), and how to free it.
  void* nccl_comm = nullptr;
  const void* nccl_library = nullptr;
  // What the NCCL GIN transport keeps per communicator (its call queue, whether a setup failed:
  // cuda/transport/gin_network.cu), made by its first buffer, under sets_mu.
  std::shared_ptr<void> nccl_gin;
  std::function<void(void*)> nccl_destroy;
  ~GroupCore();
};

struct BufferCore {
  std::shared_ptr<GroupCore> group;
  int rank = 0;
  std::shared_ptr<BufferSet> set;
  std::shared_ptr<Memory> region;
  std::shared_ptr<Stream> comm_stream;
  core::BufferPlan plan;
  int64_t timeout_ms = 0;
  int32_t num_sms = 0;
  // Operations are collective and numbered alike on every rank; the number is the epoch of the
  // barrier and notify flags. Advanced when an operation is enqueued.
  uint32_t next_epoch = 1;
  std::mutex enqueue_mu;
  RankCore& rank_core() const;

  // Low-latency calls are numbered alike on every rank (1, 2, ...); call n uses half n % 2.
  bool masking = false;
  uint32_t ll_calls = 0;
  uint32_t zero_copy_call = 0;  // the call nextCombineBuffer was last taken for
  std::shared_ptr<std::atomic<bool>> zero_copy_void;      // voids that view if another kind of call takes it
  std::shared_ptr<std::atomic<bool>> zero_copy_consumed;  // set once the zero-copy combine is queued
  // The last call enqueued on each half (shared with the views and hooks that depend on it).
  std::shared_ptr<std::atomic<uint32_t>> half_use[2] = {std::make_shared<std::atomic<uint32_t>>(0),
                                                        std::make_shared<std::atomic<uint32_t>>(0)};
  // Per half, the call whose receive waits for its hook (null once the hook ran).
  std::shared_ptr<LLWork> awaiting_hook[2];
  uint32_t* mask() const;  // u32[R] in the own header
  std::shared_ptr<void> backend_state;  // the backend's per-buffer state (CUDA: workspace)
};

// The routing one dispatch produced; combine and cached dispatch reuse it.
struct DispatchHandle {
  std::shared_ptr<GroupCore> group;
  const BufferSet* set = nullptr;  // identity of the buffer set it belongs to
  int rank = 0;
  int num_ranks = 0;
  int num_experts = 0;        // 0 without top-k
  int num_local_experts = 0;
  int num_topk = 0;
  int layout = SY_LAYOUT_COMPACT;
  int expert_alignment = 1;
  int hidden = 0;
  int64_t num_tokens = 0;
  int64_t num_rows = 0;       // rows of recv_x
  int64_t recv_capacity = 0;  // entries of the per-received-token tensors
  bool worst_case = false;
  core::DType topk_dtype = core::DType::I64;
  std::atomic<int64_t> num_recv_tokens{-1};
  // 0 while its dispatch runs, 1 once complete, 2 if it failed (then combine refuses it).
  std::atomic<int> state{0};
  std::shared_ptr<OpStatus> status;

  std::shared_ptr<Tensor> rank_prefix_matrix;  // [R, R] i32
  std::shared_ptr<Tensor> recv_src_idx;        // [cap] i32
  std::shared_ptr<Tensor> recv_src_rank;       // [cap] i32
  std::shared_ptr<Tensor> is_token_in_rank;    // [T, R] bool
  std::shared_ptr<Tensor> send_slot;           // [T, R] i32
  std::shared_ptr<Tensor> expanded_row;        // [cap, K] i32 (expanded only)

  std::mutex mu;
  bool expert_counts_known = false;
  std::vector<int32_t> expert_counts;          // aligned, per local expert

  // Backends whose dispatch completes on a device learn `state` and `num_recv_tokens` only
  // once it has: `settle` (if set) updates them when the dispatch is done and clears itself.
  std::function<void(DispatchHandle&)> settle;
  std::shared_ptr<void> backend_state;
  void refresh() {
    std::function<void(DispatchHandle&)> f;
    {
      std::lock_guard<std::mutex> l(mu);
      f = settle;
    }
    if (f) f(*this);
  }
};

// The layout one low-latency dispatch produced; combine sends the expert outputs back with it.
struct LLHandle {
  std::shared_ptr<GroupCore> group;
  const BufferSet* set = nullptr;
  int rank = 0, num_ranks = 0, num_experts = 0, num_local_experts = 0, max_tokens = 0, hidden = 0;
  int64_t num_tokens = 0;
  uint32_t call = 0;
  std::shared_ptr<Tensor> src_info;      // [EL, R * Tmax] i32
  std::shared_ptr<Tensor> layout_range;  // [EL, R] i64
  std::atomic<bool> recv_enqueued{false};  // the receive phase is in stream order (API time)
  std::atomic<bool> received{false};       // the receive phase has run (task time)
  std::shared_ptr<OpStatus> status;        // the dispatch's
  uint64_t topk_fingerprint = 0;           // of the routing it dispatched (combine must match)
  std::shared_ptr<void> backend_state;     // the backend's (CUDA: its device state)
};

// One low-latency dispatch or combine, validated.
struct LLWork {
  std::shared_ptr<OpStatus> status = std::make_shared<OpStatus>();
  int rank = 0, num_ranks = 0, num_experts = 0, num_local_experts = 0, max_tokens = 0, hidden = 0;
  int64_t num_tokens = 0;
  int topk = 0;
  uint32_t call = 0;
  int half = 0;
  int64_t timeout_ms = 0;
  bool masking = false;
  bool fp8 = false, round_scale = false, ue8m0 = false;  // dispatch
  bool logfmt = false, zero_copy = false;               // combine
  std::shared_ptr<Tensor> x, topk_idx, topk_weights;
  std::shared_ptr<Tensor> expert_stats, wait_stats;
  std::shared_ptr<Tensor> recv_x, recv_x_scales, recv_count, out;
  std::shared_ptr<LLHandle> handle;
  // How the send phase ended: the receive phase runs after a rejection too (it must still
  // acknowledge what the peers sent), but not after an abort.
  static constexpr int kSendOk = 0, kSendRejected = 1, kSendAborted = 2;
  std::atomic<int> send_state{kSendOk};
  // An earlier call on this half whose receive hook never ran and now never will: this call
  // acknowledges it before its own send, so the peers waiting to reuse the half go on.
  uint32_t ack_voided_call = 0;
  std::shared_ptr<void> backend_state;  // the backend's, from the send phase to the receive phase
};

// A deferred receive phase.
struct Hook {
  std::shared_ptr<BufferCore> buf;  // its enqueue_mu orders the hook against later calls
  std::mutex mu;
  bool ran = false;
  uint32_t call = 0;
  std::shared_ptr<std::atomic<uint32_t>> half_use;
  std::function<Error()> enqueue;  // enqueues the receive phase
};

// What sy_layout computes, validated.
struct LayoutWork {
  std::shared_ptr<OpStatus> status = std::make_shared<OpStatus>();
  int rank = 0, num_ranks = 0, num_experts = 0, ranks_per_node = 1;
  int64_t num_tokens = 0;
  int topk = 0;
  std::shared_ptr<Tensor> topk_idx;
  std::shared_ptr<Tensor> num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank;
  std::shared_ptr<Tensor> num_tokens_per_node, is_token_in_node;
};

enum class DispatchMode { Exact, WorstCase, Cached };

// One dispatch, validated; filled in stage by stage.
struct DispatchWork {
  std::shared_ptr<OpStatus> status = std::make_shared<OpStatus>();
  int rank = 0, num_ranks = 0;
  uint32_t epoch = 0;
  // Set by a backend whose dispatch_notify failed after enqueueing what the peers wait for
  // (the barrier): the epoch is spent, and the operation must still be ended in stream order.
  bool peers_wait_for_it = false;
  DispatchMode mode = DispatchMode::Exact;
  int layout = SY_LAYOUT_COMPACT;
  int expert_alignment = 1;
  bool zero_padding = false;
  int64_t num_tokens = 0;
  int hidden = 0;
  int payload_bytes = 0;      // bytes of one row of x
  int num_scales = 0;         // scale words per token (FP8), 0 for BF16
  int topk = 0;               // 0 without top-k
  int num_experts = 0, num_local_experts = 0;
  int64_t num_worst_tokens = 0;
  core::DType x_dtype = core::DType::BF16;
  core::DType scale_dtype = core::DType::F32;
  core::DType topk_dtype = core::DType::I64;

  std::shared_ptr<Tensor> x, x_scales, topk_idx, topk_weights, is_token_in_rank;
  std::shared_ptr<DispatchHandle> handle;  // the routing (new, or the cached one)
  bool cached = false;

  // Outputs, allocated before the epilogue.
  std::shared_ptr<Tensor> recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_count;
  int64_t out_rows = 0;
  std::shared_ptr<void> backend_state;  // carried from the notify stage to the epilogue

  // Counts published by the notify stage (exact size needs them on the host).
  std::mutex mu;
  std::condition_variable cv;
  int counts_state = 0;  // 0 pending, 1 ready, 2 failed
  Error counts_error;
  int64_t num_recv_tokens = 0;
  std::vector<int32_t> recv_per_source;        // rows from each source rank
  std::vector<int32_t> expert_counts_exact;    // per local expert, unaligned
  std::vector<int32_t> rank_prefix;            // [R][R]

  void publish_counts(Error e);
  Error wait_counts(Deadline deadline, int waiter_rank);
};

struct CombineWork {
  std::shared_ptr<OpStatus> status = std::make_shared<OpStatus>();
  int rank = 0, num_ranks = 0;
  uint32_t epoch = 0;
  bool peers_wait_for_it = false;  // as DispatchWork's: the epoch is spent even if the call fails
  int hidden = 0;
  int topk = 0;  // weights columns, 0 if no weights
  uint32_t internode_reduction = SY_INTERNODE_CHAIN;  // across nodes (core/internode.h)
  std::shared_ptr<DispatchHandle> handle;
  std::shared_ptr<Tensor> x, topk_weights, bias0, bias1;
  std::shared_ptr<Tensor> out, out_topk_weights;
};

// A backend: where memory lives and how streams, events and the operations run.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual sy_backend kind() const = 0;
  virtual Error init_rank(GroupCore& group, RankCore& rank) = 0;
  // Zero-filled memory of the rank, ready for any stream.
  virtual Error allocate(RankCore& rank, uint64_t bytes, std::shared_ptr<Memory>* out) = 0;
  // Memory for an operation's output, valid in the order of the work on `comm` (the stream the
  // operation runs on) and not initialised: the operation writes every byte its contract
  // defines. Nothing here waits for the device (a GPU backend allocates stream-ordered).
  // `written` says whether the operation writes all of it or a part (a low-latency receive
  // buffer, sized for the worst case), which a backend may allocate differently.
  virtual Error allocate_output(RankCore& rank, Stream& comm, uint64_t bytes, OutputWritten written,
                                std::shared_ptr<Memory>* out) {
    return allocate(rank, bytes, out);
  }
  // Bytes of the communication buffer this backend shares per rank (in a process group, or
  // between virtual ranks): the whole plan, or less when its operations do not stage payloads there.
  virtual uint64_t shared_bytes(const core::BufferPlan& plan, bool process_group) const { return plan.total_bytes; }
  // The rank's communication buffer: memory its peers can write. In a process group it is
  // exported by name (share_name) for the other processes.
  virtual Error allocate_shared(RankCore& rank, uint64_t bytes, std::shared_ptr<Memory>* out) = 0;
  // Maps a peer process's buffer by the name it exported, for a buffer of `plan` (what else the
  // name must carry may depend on it).
  virtual Error import_shared(RankCore& rank, const std::string& name, uint64_t bytes, const core::BufferPlan& plan,
                              std::shared_ptr<Memory>* out) = 0;
  // Every peer has mapped `memory`: drop its name, so it disappears with the last mapping.
  virtual Error seal_shared(Memory& memory) = 0;
  // A new buffer has joined its set (buf.set): the backend's own per-buffer state.
  virtual Error init_buffer(BufferCore& buf) { return ok(); }
  // Process groups across nodes: what the peers need to reach this rank's network engine
  // (sy_buffer_share.network_endpoint; "" where they need nothing), and a peer's, which comes
  // from another process: checked before use.
  virtual Error export_network(BufferCore& buf, std::string* endpoint) {
    endpoint->clear();
    return ok();
  }
  virtual Error import_network(BufferCore& buf, int peer, const std::string& endpoint) {
    if (endpoint.empty()) return ok();
    return invalid("share.networkEndpoint", "share.networkEndpoint: rank " + std::to_string(peer) +
                                                " reaches the network through an engine this rank does not run; "
                                                "every process must set SWITCHYARD_NIC alike");
  }
  // Rank masking: sets `count` entries of this rank's mask from `first` to `value`, or reads the
  // first `n`. The mask lives in the buffer's own header: the host backend applies these at once
  // (its stages read the mask when they run); a GPU backend, whose header is device memory,
  // orders them on the communication stream. Called with the buffer's enqueue_mu held.
  virtual Error mask_write(BufferCore& buf, int first, int count, uint32_t value);
  // sy_buffer_abandon: tells every peer of the set (their abort records) that this rank gave up
  // because rank `peer` failed; the set cannot be used again.
  virtual Error abandon(BufferCore& buf, int peer) = 0;
  virtual Error mask_read(BufferCore& buf, uint32_t* out, int n);
  // Makes the process's device current on this thread (NCCL calls need it); host: nothing.
  virtual Error bind_thread(RankCore& rank) = 0;
  // Whether the backend communicates through NCCL across processes (and why not).
  virtual Error nccl_usable() const = 0;
  virtual Error create_stream(std::shared_ptr<GroupCore> g, RankCore& rank,
                              std::shared_ptr<Stream>* out) = 0;
  // `timed`: the event can be an end of Event::elapsed_ms (the events users get); the library's
  // own ordering events are not, which on CUDA makes recording them cheaper.
  virtual Error create_event(std::shared_ptr<GroupCore> g, RankCore& rank, std::shared_ptr<Event>* out,
                             bool timed) = 0;
  // Stream-ordered copies between a tensor and dense host memory; return when done.
  virtual Error write_tensor(Stream& s, std::shared_ptr<Tensor> t, const void* src,
                             Deadline deadline) = 0;
  virtual Error read_tensor(Stream& s, std::shared_ptr<Tensor> t, void* dst,
                            Deadline deadline) = 0;
  // Enqueues a copy of src's dense bytes into dst's (checked: same rank, dense, same bytes).
  virtual Error copy_tensor(Stream& s, std::shared_ptr<Tensor> dst, std::shared_ptr<Tensor> src) = 0;

  virtual Error layout(Stream& comm, std::shared_ptr<LayoutWork> work) = 0;
  // A call refused on this rank before it was enqueued (bad arguments): takes its place in
  // the operation sequence as a rejection at the barrier, so the peers fail at once naming this
  // rank (PEER_FAILED) instead of waiting for it, and every rank's next operation lines up.
  virtual Error reject(BufferCore& buf, Stream& comm, core::OpKind kind, uint32_t epoch) = 0;
  // Stage 1: barrier, send counts and tokens to the peers, wait for theirs, count.
  virtual Error dispatch_notify(BufferCore& buf, Stream& comm,
                                std::shared_ptr<DispatchWork> work) = 0;
  // Host side of exact-size mode: wait until stage 1 has published the counts.
  virtual Error dispatch_wait_counts(DispatchWork& work, Deadline deadline) = 0;
  // Stage 2: copy what arrived into the outputs and complete the handle.
  virtual Error dispatch_epilogue(BufferCore& buf, Stream& comm,
                                  std::shared_ptr<DispatchWork> work) = 0;
  // Stage 1 ran but the host failed before stage 2 (counts wait, allocation): end the
  // operation's protocol in stream order, so that no peer waits for this rank.
  virtual void dispatch_abandon(BufferCore& buf, Stream& comm, std::shared_ptr<DispatchWork> work) {}
  virtual Error combine(BufferCore& buf, Stream& comm, std::shared_ptr<CombineWork> work) = 0;
  // Low-latency mode: the send and receive phases of dispatch and combine, and the reset.
  virtual Error ll_dispatch_send(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) = 0;
  virtual Error ll_dispatch_recv(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) = 0;
  virtual Error ll_combine_send(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) = 0;
  virtual Error ll_combine_recv(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) = 0;
  virtual Error ll_clean(BufferCore& buf, Stream& s, uint32_t epoch, std::shared_ptr<OpStatus> status) = 0;
  // A low-latency call refused on this rank before its send phase was enqueued (`work` holds
  // its call number and half): tells every destination this rank rejected its input, as a send
  // phase that finds bad input does, and acknowledges what the peers sent into the half, so they
  // fail that call at once naming this rank and the next call lines up.
  virtual Error ll_reject(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work, bool dispatch) = 0;
  // Whether dispatch/combine run on this backend in this build.
  virtual bool dispatch_supported() const = 0;
};

std::unique_ptr<Backend> make_host_backend();
// nullptr plus a reason when this build or machine has no CUDA backend.
std::unique_ptr<Backend> make_cuda_backend(Error* why);
Error probe_cuda(sy_backend_info* info);

}  // namespace sy
