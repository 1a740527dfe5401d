// Normal-mode dispatch and combine on the CUDA backend: per-buffer state, marshalling of the
// validated work into kernel arguments, and the host side of exact-size dispatch.
#include "cuda_normal.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "../abi/ops.h"
#include "../abi/protocol_errors.h"
#include "../core/internode.h"
#include "../core/op_desc.h"
#include "device_memory.h"
#include "normal_kernels.h"
#include "ordered_rank.cuh"
#include "transport/emulated_nic.h"
#include "transport/gin_network.h"
#include "transport/proxy.h"
#include "transport/verbs_engine.h"

namespace sy::cuda {

namespace {

// Buffers of one GPU wait for each other in one-block kernels; more ranks per GPU than this
// would make two ranks' streams share a hardware queue even with the most queues CUDA has (32),
// where a waiting kernel can sit in front of the kernel it waits for: each rank drives a
// communication and a compute stream, and the allocation stream and the legacy stream take two
// more (device_memory.h). Fewer queues are checked stream by stream (begin_operation).
constexpr int kMaxRanksPerDevice = 14;

// A rank's per-buffer state: where its exchange page and staging areas are in its shared buffer
// (read by the peers), and its private workspace.
struct CudaBuffer {
  SharedLayout sl;
  ExchangeLayout xl;
  uint8_t* own = nullptr;  // this rank's shared buffer
  std::shared_ptr<Memory> fixed, tables, rank_counts, recv_local, recv_mask;
  Workspace ws;
  bool tables_ready = false;
  std::vector<int> shared_devices;  // the GPUs whose queues must not be shared (two ranks or more, or a NIC stream)
  uint8_t* const* d_bases = nullptr;
  uint8_t* const* d_xchg = nullptr;
  // Two hops (normal_network.cu): the set's network fabric (the emulated NIC's, or ibverbs'
  // directory), this rank's proxy and the device's NIC stream the emulated NIC's copies go on,
  // its channels and network counters in device memory.
  std::shared_ptr<BufferSet> set;  // what the proxy counts into, and the windows it writes
  std::shared_ptr<void> fabric;  // the set's NetworkFabric
  // Between processes with ibverbs: the engine, made when the buffer is exported (its queue
  // pairs' numbers go with the share) and connected to each peer on import; the proxy takes it.
  std::unique_ptr<transport::NicEngine> pending_engine;
  std::unique_ptr<transport::Proxy> proxy;
  // Between processes with NCCL GIN: its window and device communicator, begun when the buffer is
  // exported (the calls are collective), ready before the network starts; no proxy then.
  std::shared_ptr<transport::GinNetwork> gin;
  bool network_started = false;  // set last: every field above is ready
  // pending_engine, engine_taken, gin and endpoint_text: export and import (not under the enqueue lock,
  // which a first operation holds while it waits for the imports) against the network's start.
  std::mutex net_mu;
  bool engine_taken = false;  // the network's start took (or made) the engine: no other is made
  std::string endpoint_text;  // this rank's, as exported first
  int device = -1;
  std::shared_ptr<Memory> net_state;
  NetworkArgs net;

  CudaBuffer() = default;
  CudaBuffer(const CudaBuffer&) = delete;
  CudaBuffer& operator=(const CudaBuffer&) = delete;
  ~CudaBuffer() {
    // Kernels queued before may still use the network: GIN's window and device communicator go
    // once the work queued so far has completed.
    if (gin && device >= 0) run_when_done([keep = std::move(gin)]() {}, device);
    if (!proxy) return;
    // Kernels queued before may still post to the proxy, and its puts write into the peers'
    // windows: it goes once the work queued so far has completed, the set (counters, windows)
    // and the fabric kept until then.
    transport::Proxy* p = proxy.release();
    run_when_done([p, keep_set = set, keep_fabric = fabric]() { delete p; }, device);
  }
};

CudaBuffer& buffer_state(BufferCore& buf) { return *static_cast<CudaBuffer*>(buf.backend_state.get()); }

// What the buffer's proxy's NIC engine said when it failed (its refusal names both ranks and the
// NIC's status), for an operation's error that says so.
std::function<std::string()> nic_said(const CudaBuffer& st) {
  return st.proxy ? st.proxy->refusal_reader() : std::function<std::string()>();
}

template <class T>
T* at(const std::shared_ptr<Memory>& m, uint64_t off = 0) {
  return reinterpret_cast<T*>(static_cast<uint8_t*>(m->ptr) + off);
}

// Whether this rank's kernels (on GPU `mine`) can work with peer `rank`'s memory on GPU `dev`.
Error check_peer_gpu(int rank, int mine, int dev) {
  int can = 0;
  SY_CUDA(cudaDeviceCanAccessPeer(&can, mine, dev));
  if (!can) {
    return fail(SY_ERROR_UNSUPPORTED, "rank " + std::to_string(rank) + " is on GPU " + std::to_string(dev) +
                                          ", which GPU " + std::to_string(mine) +
                                          " cannot address (no peer access); put the ranks on GPUs "
                                          "connected by NVLink or PCIe peer-to-peer");
  }
  // The kernels take the peers' abort records with system-scope atomics, which PCIe
  // peer-to-peer does not carry: refused rather than racing.
  int atomics = 0;
  SY_CUDA(cudaDeviceGetP2PAttribute(&atomics, cudaDevP2PAttrNativeAtomicSupported, mine, dev));
  if (!atomics) {
    return fail(SY_ERROR_UNSUPPORTED, "rank " + std::to_string(rank) + " is on GPU " + std::to_string(dev) +
                                          ", and GPU " + std::to_string(mine) +
                                          " has no native atomics on its memory (peer-to-peer over PCIe); put "
                                          "the ranks on GPUs connected by NVLink, or on one GPU");
  }
  return ok();
}

// A process group's rank `r`: its proxy's signal array, as this process maps it (shared with its
// buffer, cuda_backend.cu).
Error peer_signals(const BufferSet& set, int r, uint64_t** out) {
  const std::shared_ptr<Memory>& m = set.regions[size_t(r)];
  if (!m || !m->companion || m->companion->bytes < network_signal_bytes(int(set.bases.size()))) {
    return invalid("share", "share: rank " + std::to_string(r) +
                                "'s buffer came without the signal segment its two hops across nodes need; every "
                                "process must load the same library");
  }
  *out = static_cast<uint64_t*>(m->companion->ptr);
  return ok();
}

}  // namespace

uint64_t network_signal_bytes(int ranks) { return sizeof(uint64_t) * uint64_t(ranks) * uint64_t(kNetworkSignals); }

namespace {

// What the two hops' network puts go through, one per buffer set: the emulated NIC's fabric, the
// directory where the ranks' ibverbs engines find each other, or NCCL GIN (SWITCHYARD_NIC).
struct NetworkFabric {
  bool verbs = false;
  bool gin = false;
  std::shared_ptr<transport::EmulatedFabric> emulated;
  std::shared_ptr<transport::VerbsDirectory> directory;
  transport::VerbsSettings verbs_settings;
};

// SWITCHYARD_NIC: "emulated" (the default), "ibverbs" or "gin".
Error make_network_fabric(const BufferCore& buf, std::shared_ptr<NetworkFabric>* out) {
  auto f = std::make_shared<NetworkFabric>();
  const char* v = std::getenv("SWITCHYARD_NIC");
  const std::string kind = v == nullptr ? "" : v;
  const int R = buf.group->num_ranks;
  if (kind.empty() || kind == "emulated") {
    f->emulated = std::make_shared<transport::EmulatedFabric>(R, kNetworkSignals, buf.set->nic);
  } else if (kind == "ibverbs") {
    if (buf.set->nic.active()) {
      return invalid("emulatedNic", "emulatedNic: a link model is the emulated NIC's; with SWITCHYARD_NIC=ibverbs "
                                    "the network hop is the NIC's own");
    }
    SY_TRY(transport::VerbsSettings::from_environment(&f->verbs_settings));
    f->verbs = true;
    f->directory = transport::make_verbs_directory(R);
  } else if (kind == "gin") {
    if (buf.set->nic.active()) {
      return invalid("emulatedNic", "emulatedNic: a link model is the emulated NIC's; with SWITCHYARD_NIC=gin "
                                    "the network hop is the NIC's own");
    }
    if (!buf.group->process_group) {
      return fail(SY_ERROR_UNSUPPORTED, "SWITCHYARD_NIC=gin: NCCL GIN needs a process group, one GPU per rank "
                                        "(NCCL's ranks cannot share a GPU); virtual ranks use the emulated NIC");
    }
    f->gin = true;
  } else {
    return invalid("SWITCHYARD_NIC", "SWITCHYARD_NIC=" + kind + ": expected emulated, ibverbs or gin");
  }
  *out = std::move(f);
  return ok();
}

// Two hops, once per buffer: the set's network fabric (the first member makes it), this rank's
// proxy on its buffer, the proxy's channels and the network counters in device memory. Between
// processes the set is this process's view: the emulated fabric also holds the peers' buffers
// and signal arrays as mapped here, and this rank's signals are its shared segment.
// The set's network fabric; the first member to ask makes it.
Error network_fabric(BufferCore& buf, std::shared_ptr<NetworkFabric>* out) {
  BufferSet& set = *buf.set;
  std::lock_guard<std::mutex> l(set.mu);
  if (!set.backend_state) {
    std::shared_ptr<NetworkFabric> made;
    SY_TRY(make_network_fabric(buf, &made));
    set.backend_state = made;
  }
  *out = std::static_pointer_cast<NetworkFabric>(set.backend_state);
  return ok();
}

// This rank's ibverbs engine on its buffer, made once, with queue pairs to the ranks its network
// hop reaches: the ranks of the other nodes with its local index (core/internode.h).
Error make_verbs_engine(BufferCore& buf, const NetworkFabric& fabric, int device,
                        std::unique_ptr<transport::NicEngine>* out) {
  CudaBuffer& st = buffer_state(buf);
  const int P = buf.group->ranks_per_node, N = buf.group->num_ranks / P;
  std::vector<int> column;
  for (int m = 0; m < N; ++m)
    if (m != core::node_of(buf.rank, P)) column.push_back(core::forwarder(m, buf.rank, P));
  return transport::create_verbs_engine(fabric.directory, buf.rank, column, kNetworkSignals, device, st.own,
                                        st.sl.bytes, fabric.verbs_settings, out);
}

// The CPU proxy on this rank's buffer, with its NIC engine (emulated or ibverbs). A failure on
// the way drops the proxy again (no kernel has seen it), so that a later call starts over (between
// processes with ibverbs it cannot: the engine connected on import went with it).
Error start_proxy(BufferCore& buf, NetworkFabric& fabric, int device, std::unique_ptr<transport::Proxy>* out) {
  CudaBuffer& st = buffer_state(buf);
  BufferSet& set = *buf.set;
  const int R = buf.group->num_ranks, N = buf.plan.nodes;
  // The device's NIC stream, on a hardware queue of its own (device_memory.h): the copies never
  // wait behind a kernel that waits for them.
  cudaStream_t nic = nullptr;
  SY_CUDA(acquire_nic_stream(device, &nic));
  transport::ProxyOptions o;
  o.rank = buf.rank;
  o.device = device;
  o.channels = 2 * N;
  o.entries = 64;
  o.counters = &set.network[size_t(buf.rank)];
  o.signal_slots = kNetworkSignals;
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < kNetworkSignals; ++s)
      o.signal_channels.push_back(signal_channel(s, core::node_of(r, buf.plan.ranks_per_node), N));
  if (buf.group->process_group) {
    SY_TRY(peer_signals(set, buf.rank, &o.signals));
    for (int r = 0; r < R && !fabric.verbs; ++r) {
      if (r == buf.rank) continue;
      transport::EmulatedFabric::Window w{set.bases[size_t(r)], st.sl.bytes, nullptr};
      SY_TRY(peer_signals(set, r, &w.signals));
      fabric.emulated->attach(r, w);
    }
  }
  std::unique_ptr<transport::NicEngine> engine;
  std::unique_lock<std::mutex> net_lock(st.net_mu);
  if (fabric.verbs) st.engine_taken = true;
  if (fabric.verbs && st.pending_engine) {
    engine = std::move(st.pending_engine);  // a process group's, connected to every peer on import
  } else if (fabric.verbs && buf.group->process_group) {
    // Its queue pairs were connected to the peers' on import; an engine made now would not be.
    return fail(SY_ERROR_UNSUPPORTED, "rank " + std::to_string(buf.rank) +
                                          ": the buffer's ibverbs engine went with an earlier failed start of its "
                                          "network (or the buffer was never exported); create the buffers again");
  } else if (fabric.verbs) {
    SY_TRY(make_verbs_engine(buf, fabric, device, &engine));
  } else {
    SY_TRY(transport::EmulatedNic::create(*fabric.emulated, buf.rank, st.own, st.sl.bytes, nic, &engine));
  }
  net_lock.unlock();
  return transport::Proxy::create(o, std::move(engine), out);
}

Error start_network(BufferCore& buf, CudaStream& comm) {
  CudaBuffer& st = buffer_state(buf);
  if (st.network_started) return ok();  // an earlier call got all the way (everything is set last)
  const core::BufferPlan& plan = buf.plan;
  const int N = plan.nodes;
  std::shared_ptr<NetworkFabric> fabric;
  SY_TRY(network_fabric(buf, &fabric));
  const int device = comm.rank_state_ref().device;
  const uint64_t timeout_ns = uint64_t(buf.timeout_ms) * 1000000ull;
  std::vector<transport::NetChannel> channels(size_t(2 * N));
  std::unique_ptr<transport::Proxy> proxy;
  std::shared_ptr<transport::GinNetwork> gin;
  if (fabric->gin) {
    {
      std::lock_guard<std::mutex> net_lock(st.net_mu);
      gin = st.gin;
    }
    if (!gin) {
      return fail(SY_ERROR_UNSUPPORTED, "rank " + std::to_string(buf.rank) +
                                            ": SWITCHYARD_NIC=gin: the buffer was never exported (NCCL GIN's "
                                            "window is made by every rank together when it exports its buffer)");
    }
    SY_TRY(gin->wait_ready(Deadline::after_ms(buf.timeout_ms)));
  } else {
    SY_TRY(start_proxy(buf, *fabric, device, &proxy));
    for (int c = 0; c < 2 * N; ++c) channels[size_t(c)].proxy = proxy->channel(c, timeout_ns);
  }
  // [2N] channels, then u64 sent[lanes][N], taken[lanes][N], then i32 broken, then (GIN) u64
  // posted[2N].
  const uint64_t off_counters = core::align_up(sizeof(transport::NetChannel) * channels.size(), 16);
  const uint64_t counters = uint64_t(core::kNetLanes) * uint64_t(N);
  const uint64_t off_posted = off_counters + 16 * counters + 16;
  const uint64_t bytes = off_posted + 8 * channels.size();
  std::shared_ptr<Memory> net_state;
  SY_TRY(buf.group->backend->allocate(buf.rank_core(), bytes, &net_state));
  SY_CUDA(cudaMemsetAsync(at<uint8_t>(net_state, off_counters), 0, bytes - off_counters, comm.raw()));
  uint8_t* net_base = st.own;
  if (gin) {
    SY_TRY(gin->fill_channels(channels.data(), 2 * N, at<uint64_t>(net_state, off_posted), timeout_ns));
    net_base = gin->window() - st.sl.off_net_in;  // the window holds the network regions, from off_net_in on
  }
  SY_TRY(comm.rank_state_ref().staging->to_device(net_state->ptr, channels.data(),
                                                  sizeof(transport::NetChannel) * channels.size(), comm.raw(),
                                                  Deadline::after_ms(buf.timeout_ms), buf.rank));
  NetworkArgs& n = st.net;
  n.ranks_per_node = plan.ranks_per_node;
  n.nodes = N;
  n.relay = st.own + st.sl.off_relay;
  n.off_relay = st.sl.off_relay;
  n.off_net_in = st.sl.off_net_in;
  n.off_net_out = st.sl.off_net_out;
  n.net_base = net_base;
  n.entries = plan.net_ring_entries;
  n.entry_bytes = plan.net_entry_bytes;
  n.record_bytes = plan.record_bytes;
  n.rec_payload = plan.rec_payload;
  n.rec_scales = plan.rec_scales;
  n.rec_topk_idx = plan.rec_topk_idx;
  n.rec_topk_weights = plan.rec_topk_weights;
  n.rec_src_idx = plan.rec_src_idx;
  n.net_record_bytes = plan.net_record_bytes;
  n.net_slots = plan.net_slots;
  n.net_chain_next = plan.net_chain_next;
  n.net_chain_prev = plan.net_chain_prev;
  n.net_payload = plan.net_payload;
  n.net_partial_weights = plan.net_partial_weights;
  n.net_partial_bytes = plan.net_partial_bytes;
  n.net_result_bytes = plan.net_result_bytes;
  n.row_payload = plan.row_payload;
  n.row_topk_weights = plan.row_topk_weights;
  n.off_forward_epoch = plan.off_forward_epoch;
  n.off_forwarded = plan.off_forwarded;
  n.off_started = plan.off_net_epoch;
  n.off_announced = plan.off_net_tail;
  n.channels = at<const transport::NetChannel>(net_state);
  n.sent = at<uint64_t>(net_state, off_counters);
  n.taken = n.sent + counters;
  n.broken = reinterpret_cast<int32_t*>(n.taken + counters);
  st.set = buf.set;
  st.fabric = fabric;
  st.device = device;
  st.net_state = net_state;
  std::lock_guard<std::mutex> net_lock_again(st.net_mu);
  st.proxy = std::move(proxy);
  st.network_started = true;
  return ok();
}

// Between processes with ibverbs: the buffer's engine, made on the first call (export, or the
// first import), once; with st.net_mu held.
Error pending_verbs_engine(BufferCore& buf, const NetworkFabric& fabric, transport::NicEngine** out) {
  CudaBuffer& st = buffer_state(buf);
  if (!st.pending_engine && !st.engine_taken) {
    SY_TRY(make_verbs_engine(buf, fabric, rank_state(buf.rank_core()).device, &st.pending_engine));
  }
  if (!st.pending_engine) {
    return fail(SY_ERROR_UNSUPPORTED, "rank " + std::to_string(buf.rank) +
                                          ": the buffer's network has started: its ibverbs engine takes no more "
                                          "peers; create the buffers again");
  }
  *out = st.pending_engine.get();
  return ok();
}

// What a rank's share says of its GIN network: the window's place and size, which every rank's
// must match (the window is symmetric).
constexpr const char* kGinEndpoint = "gin ";
std::string gin_endpoint(const CudaBuffer& st) {
  return kGinEndpoint + std::to_string(st.sl.off_net_in) + "+" + std::to_string(st.sl.bytes - st.sl.off_net_in);
}

// How a rank reaches the network, as its share's endpoint says (empty: the emulated NIC, or one
// hop), or as this rank's fabric (null: one hop) does.
const char* network_kind(const std::string& endpoint) {
  return endpoint.empty() ? "the emulated NIC" : endpoint.rfind(kGinEndpoint, 0) == 0 ? "NCCL GIN" : "ibverbs";
}
const char* network_kind(const NetworkFabric* f) {
  return f == nullptr || (!f->gin && !f->verbs) ? "the emulated NIC" : f->gin ? "NCCL GIN" : "ibverbs";
}

// Begins this rank's part of the GIN network's collective setup (transport/gin_network.h): a
// window over the network regions, a context per channel, a signal per (rank, slot).
Error begin_gin_network(BufferCore& buf, std::shared_ptr<transport::GinNetwork>* out) {
  CudaBuffer& st = buffer_state(buf);
  GroupCore& g = *buf.group;
  const int N = buf.plan.nodes, my_node = core::node_of(buf.rank, buf.plan.ranks_per_node);
  transport::GinNetworkOptions o;
  o.lib = static_cast<const nccl::Library*>(g.nccl_library);
  o.comm = g.nccl_comm;
  std::lock_guard<std::mutex> l(g.sets_mu);  // for nccl_gin
  o.comm_state = &g.nccl_gin;
  o.rank = buf.rank;
  o.ranks = g.num_ranks;
  o.device = rank_state(buf.rank_core()).device;
  o.channels = 2 * N;
  o.slots = kNetworkSignals;
  for (int s = 0; s < kNetworkSignals; ++s) o.slot_context.push_back(signal_channel(s, my_node, N));
  o.origin = st.sl.off_net_in;
  o.window_bytes = st.sl.bytes - st.sl.off_net_in;
  return transport::GinNetwork::begin(o, buf.group, out);
}

}  // namespace

Error normal_export_network(BufferCore& buf, std::string* endpoint) {
  endpoint->clear();
  CudaBuffer& st = buffer_state(buf);
  if (!st.sl.two_hop) return ok();
  std::shared_ptr<NetworkFabric> fabric;
  SY_TRY(network_fabric(buf, &fabric));
  if (fabric->gin) {
    std::lock_guard<std::mutex> l(st.net_mu);
    if (!st.gin) SY_TRY(begin_gin_network(buf, &st.gin));
    *endpoint = gin_endpoint(st);
    return ok();
  }
  if (!fabric->verbs) return ok();
  std::lock_guard<std::mutex> l(st.net_mu);
  if (st.endpoint_text.empty()) {  // the same text every time, also once the engine is the proxy's
    transport::NicEngine* engine = nullptr;
    SY_TRY(pending_verbs_engine(buf, *fabric, &engine));
    SY_TRY(transport::verbs_endpoint_text(*engine, &st.endpoint_text));
  }
  *endpoint = st.endpoint_text;
  return ok();
}

Error normal_import_network(BufferCore& buf, int peer, const std::string& endpoint) {
  CudaBuffer& st = buffer_state(buf);
  std::shared_ptr<NetworkFabric> fabric;
  if (st.sl.two_hop) SY_TRY(network_fabric(buf, &fabric));
  const std::string theirs = network_kind(endpoint), mine = network_kind(fabric.get());
  if (theirs != mine) {
    return invalid("share.networkEndpoint", "share.networkEndpoint: rank " + std::to_string(peer) +
                                                " reaches the network through " + theirs + ", this rank through " +
                                                mine + "; every process must set SWITCHYARD_NIC alike");
  }
  if (!fabric || (!fabric->verbs && !fabric->gin)) return ok();
  if (fabric->gin) {
    // The windows are symmetric: a peer whose buffer has another size has another plan.
    std::lock_guard<std::mutex> l(st.net_mu);
    if (endpoint != gin_endpoint(st)) {
      return invalid("share.networkEndpoint", "share.networkEndpoint: rank " + std::to_string(peer) +
                                                  "'s GIN window (" + endpoint + ") differs from this rank's (" +
                                                  gin_endpoint(st) + ")");
    }
    return ok();
  }
  std::lock_guard<std::mutex> l(st.net_mu);
  transport::NicEngine* engine = nullptr;
  SY_TRY(pending_verbs_engine(buf, *fabric, &engine));  // made now if a peer's share came first
  return transport::verbs_import_endpoint(*engine, peer, endpoint);
}

namespace {

// Once per buffer, when every rank has joined: the device tables of the peers' buffers and
// exchange pages, and the checks that the ranks' waiting kernels can all be resident at once.
Error ensure_tables(BufferCore& buf, CudaStream& comm) {
  CudaBuffer& st = buffer_state(buf);
  if (st.tables_ready) return ok();
  BufferSet& set = *buf.set;
  const int R = buf.group->num_ranks;
  std::vector<uint8_t*> table(size_t(2 * R), nullptr);
  {
    std::unique_lock<std::mutex> l(set.mu);
    const Deadline d = Deadline::after_ms(buf.timeout_ms);
    auto missing = [&] {
      for (int r = 0; r < R; ++r)
        if (set.bases[size_t(r)] == nullptr) return r;
      return -1;
    };
    while (missing() >= 0 && !d.expired()) set.cv.wait_for(l, std::chrono::duration<double>(d.remaining_seconds()));
    if (const int first = missing(); first >= 0) {
      std::string list;
      for (int r = 0; r < R; ++r)
        if (set.bases[size_t(r)] == nullptr) list += (list.empty() ? "" : ", ") + std::to_string(r);
      core::WaitFailure w;
      w.rank = buf.rank;
      w.peer = first;
      w.role = core::WaitRole::BufferPeers;
      w.expected = R;
      w.observed = set.joined;
      w.waited_seconds = double(buf.timeout_ms) / 1000.0;
      return timeout_error(w, "ranks without a matching buffer: " + list);
    }
    for (int r = 0; r < R; ++r) {
      table[size_t(r)] = set.bases[size_t(r)];
      table[size_t(R + r)] = set.bases[size_t(r)] + st.sl.off_xchg;
    }
  }

  if (R > kMaxSources) {
    return invalid("ranks", "ranks: the CUDA backend runs buffer sets of up to " + std::to_string(kMaxSources) +
                                " ranks, this group has " + std::to_string(R));
  }
  // Co-residency: every rank on this GPU keeps one waiting block resident during an operation.
  GroupCore& g = *buf.group;
  const CudaRank& mine = rank_state(buf.rank_core());
  int on_device = 0;
  for (const auto& r : g.ranks) {
    const int dev = rank_state(*r).device;
    if (dev == mine.device) ++on_device;
    if (dev != mine.device) SY_TRY(check_peer_gpu(r->index, mine.device, dev));
  }
  if (g.process_group) {
    // The peers live in other processes: their GPUs are where their buffers, opened by IPC
    // handle, live (a GPU this process cannot see is left to the driver, which mapped it).
    for (int r = 0; r < R; ++r) {
      if (r == buf.rank) continue;
      cudaPointerAttributes attr;
      if (cudaPointerGetAttributes(&attr, table[size_t(r)]) != cudaSuccess) {
        (void)cudaGetLastError();
        continue;
      }
      if (attr.type == cudaMemoryTypeDevice && attr.device >= 0 && attr.device != mine.device) {
        SY_TRY(check_peer_gpu(r, mine.device, attr.device));
      }
    }
  }
  int per_sm = 0;
  SY_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sync_kernel_for_occupancy(), kSyncThreads, 0));
  const int64_t resident = int64_t(per_sm) * mine.sm_count;
  if (on_device > kMaxRanksPerDevice || on_device > resident) {
    return invalid("ranks", "ranks: " + std::to_string(on_device) + " ranks share GPU " + std::to_string(mine.device) +
                                "; their waiting kernels must all be resident at once, and at most " +
                                std::to_string(std::min<int64_t>(kMaxRanksPerDevice, resident)) +
                                " can be (" + std::to_string(resident) +
                                " blocks fit, and the driver keeps 32 hardware queues); use fewer ranks per GPU");
  }
  if (buf.num_sms > mine.sm_count) {
    return invalid("numSms", "numSms: " + std::to_string(buf.num_sms) + " exceeds the " +
                                 std::to_string(mine.sm_count) + " SMs of GPU " + std::to_string(mine.device));
  }

  std::map<int, int> per_device;
  for (const auto& r : g.ranks) per_device[rank_state(*r).device] += 1;
  // Two hops: a rank's network kernel also waits for its device's NIC stream, which must not
  // share its queue either, whatever the ranks per GPU.
  for (const auto& [dev, n] : per_device)
    if (n > 1 || st.sl.two_hop) st.shared_devices.push_back(dev);
  if (st.sl.two_hop) SY_TRY(start_network(buf, comm));
  SY_TRY(g.backend->allocate(buf.rank_core(), sizeof(uint8_t*) * table.size(), &st.tables));
  // In stream order before the kernels that read it, through the rank's pinned chunks (never the
  // driver's pageable path, host_copy.h); `table` may go once the call returns.
  SY_TRY(comm.rank_state_ref().staging->to_device(st.tables->ptr, table.data(), sizeof(uint8_t*) * table.size(),
                                                  comm.raw(), Deadline::after_ms(buf.timeout_ms), buf.rank));
  st.d_bases = at<uint8_t* const>(st.tables);
  st.d_xchg = at<uint8_t* const>(st.tables) + R;
  st.tables_ready = true;
  return ok();
}

// What every operation checks first: the rank's device current, the peer tables in place.
Error begin_operation(BufferCore& buf, CudaStream& comm, const char* op) {
  const int dev = comm.rank_state_ref().device;
  SY_CUDA(cudaSetDevice(dev));
  SY_TRY(ensure_tables(buf, comm));  // checks the ranks per GPU first: the likelier cause
  // Ranks that share a GPU wait for each other's kernels: their streams need hardware queues of
  // their own (device_memory.h), or a waiting kernel could hold up the kernel it waits for.
  // Every GPU of the group is looked at, so every rank comes to the same verdict (a rank that
  // refused alone would leave its peers waiting: nothing may be launched on a shared queue).
  for (const int shared : buffer_state(buf).shared_devices) {
    if (const QueueSharing q = queue_sharing(shared); q.shared) {
      return fail(SY_ERROR_UNSUPPORTED,
                  std::string(op) + ": " + (buffer_state(buf).sl.two_hop ? "the ranks and the NIC stream" : "ranks") +
                      " share GPU " + std::to_string(shared) + ", whose " +
                      std::to_string(q.streams) + " streams (the library's own and the legacy one included) share its " +
                      std::to_string(q.queues) + " hardware queues (" + q.source +
                      "): a kernel waiting for a peer could hold up the very kernel it waits for. Set "
                      "CUDA_DEVICE_MAX_CONNECTIONS=32 before anything in the process uses CUDA, dispose of unused "
                      "streams and buffers, or use fewer ranks per GPU");
    }
  }
  return ok();
}

SyncArgs sync_args(const BufferCore& buf, uint32_t epoch, const CudaBuffer& st, KernelReport* report) {
  SyncArgs s;
  s.rank = buf.rank;
  s.ranks = buf.group->num_ranks;
  s.epoch = epoch;
  s.timeout_ns = uint64_t(buf.timeout_ms) * 1000000ull;
  s.bases = st.d_bases;
  s.off_abort = buf.plan.off_abort;
  s.off_op_kind = buf.plan.off_op_kind;
  s.off_op_desc = buf.plan.off_op_desc;
  s.off_barrier = buf.plan.off_barrier_epoch;
  s.report = report;
  return s;
}

const uint8_t* bytes_of(const std::shared_ptr<Tensor>& t) { return t ? t->data() : nullptr; }
int64_t stride_bytes(const std::shared_ptr<Tensor>& t, int dim) {
  return t ? t->strides[dim] * t->element_size() : 0;
}

// What one dispatch carries from its notify stage to its epilogue.
struct DispatchOp {
  std::shared_ptr<ReportSlot> report;
  cudaStream_t stream = nullptr;  // the communication stream its kernels run on
  DispatchArgs args;
  std::shared_ptr<Tensor> state;  // the handle's device state word
};

struct HandleState {
  std::shared_ptr<Tensor> state;  // i32[1] on the device: 1 complete, 2 failed (combine checks it)
  std::shared_ptr<Tensor> forward;  // two hops: what this rank forwards in the combine (ForwardTable)
};

uint64_t forward_words(const core::BufferPlan& p) {
  return ForwardTable::words(p.nodes, p.max_tokens_per_rank, p.ranks_per_node);
}

// The handle's table as the buffer's plan lays it out; nothing if the handle has none, or one
// laid out for another plan.
ForwardTable forward_table(const BufferCore& buf, const HandleState& hs) {
  ForwardTable f;
  if (!hs.forward || uint64_t(hs.forward->numel()) != forward_words(buf.plan)) return f;
  f.base = reinterpret_cast<int32_t*>(hs.forward->data());
  f.nodes = buf.plan.nodes;
  f.tokens = buf.plan.max_tokens_per_rank;
  f.ranks_per_node = buf.plan.ranks_per_node;
  return f;
}

int blocks_of(const BufferCore& buf) { return std::max(1, buf.num_sms); }

}  // namespace

Error begin_buffer_operation(BufferCore& buf, CudaStream& stream, const char* op, uint8_t* const** bases) {
  SY_TRY(begin_operation(buf, stream, op));
  *bases = buffer_state(buf).d_bases;
  return ok();
}

uint64_t normal_shared_bytes(const core::BufferPlan& plan, bool process_group) {
  return shared_layout(plan, process_group).bytes;
}


Error normal_init_buffer(BufferCore& buf) {
  auto st = std::make_shared<CudaBuffer>();
  const int R = buf.group->num_ranks;
  st->sl = shared_layout(buf.plan, buf.group->process_group);
  if (st->sl.two_hop && buf.plan.nodes > kMaxNodes) {
    const char* what = buf.group->process_group ? "LOCAL_WORLD_SIZE" : "ranksPerNode";
    return fail(SY_ERROR_UNSUPPORTED, std::string(what) + ": the CUDA backend's two hops span up to " +
                                          std::to_string(kMaxNodes) + " nodes, this group has " +
                                          std::to_string(buf.plan.nodes) + " (use fewer, larger nodes, or " +
                                          "internodePath: \"direct\")",
                what);
  }
  st->xl = st->sl.xl;
  st->own = static_cast<uint8_t*>(buf.region->ptr);
  Backend& be = *buf.group->backend;
  // Fixed workspace: i32 recv_start[R] recv_cnt[R] expert_count[EMAX] rank_totals[max(R, EMAX)]
  // passed[1], then i64 totals[2] group_base[EMAX] pad_prefix[EMAX + 1].
  const uint64_t EMAX = core::kMaxExpertsPerRank;
  const uint64_t ints = 2 * uint64_t(R) + EMAX + std::max<uint64_t>(uint64_t(R), EMAX) + 1;
  const uint64_t off_i64 = core::align_up(4 * ints, 16);
  SY_TRY(be.allocate(buf.rank_core(), off_i64 + 8 * (2 + EMAX + EMAX + 1), &st->fixed));
  int32_t* p = at<int32_t>(st->fixed);
  st->ws.recv_start = p;
  st->ws.recv_cnt = p + R;
  st->ws.expert_count = p + 2 * R;
  st->ws.rank_totals = p + 2 * R + EMAX;
  st->ws.passed_barrier = p + ints - 1;
  st->ws.totals = at<int64_t>(st->fixed, off_i64);
  st->ws.group_base = st->ws.totals + 2;
  st->ws.pad_prefix = st->ws.group_base + EMAX;
  // The orderings' scratch, sized once for the largest operation the buffer admits (growing it
  // later would free memory, and cudaFree waits for every kernel on the device, peers' included):
  // tokens per destination, received rows per local expert (expanded layout), their experts.
  const int64_t max_rows = buf.plan.max_recv_rows();
  const uint64_t rank_ints = std::max<uint64_t>(uint64_t(rank_chunks(buf.plan.max_tokens_per_rank)) * uint64_t(R),
                                                uint64_t(rank_chunks(max_rows)) * EMAX);
  SY_TRY(be.allocate(buf.rank_core(), 4 * rank_ints, &st->rank_counts));
  SY_TRY(be.allocate(buf.rank_core(), 4 * uint64_t(max_rows) * core::kMaxTopk, &st->recv_local));
  SY_TRY(be.allocate(buf.rank_core(), 4 * uint64_t(max_rows) * (core::kMaxExpertsPerRank / 32), &st->recv_mask));
  st->ws.rank_counts = at<int32_t>(st->rank_counts);
  st->ws.recv_local = at<int32_t>(st->recv_local);
  st->ws.recv_mask = at<uint32_t>(st->recv_mask);
  buf.backend_state = st;
  return ok();
}

Error normal_reject(BufferCore& buf, CudaStream& comm, core::OpKind kind, uint32_t epoch) {
  SY_TRY(begin_operation(buf, comm, core::op_kind_name(uint32_t(kind))));
  std::shared_ptr<ReportSlot> report;
  SY_TRY(comm.rank_state_ref().reports->take(&report));
  RejectedDesc desc;
  core::rejected_desc(desc.words, kind);
  SY_CUDA(launch_reject(sync_args(buf, epoch, buffer_state(buf), report->device), desc, comm.raw()));
  return report->seal(comm.raw());  // nobody reads it: the refusal was reported to the caller
}

Error normal_abandon(BufferCore& buf, CudaStream& comm, int peer) {
  SY_TRY(begin_operation(buf, comm, "abandon"));
  std::shared_ptr<ReportSlot> report;
  SY_TRY(comm.rank_state_ref().reports->take(&report));
  SY_CUDA(launch_abandon(sync_args(buf, buf.next_epoch, buffer_state(buf), report->device), peer, comm.raw()));
  return report->seal(comm.raw());
}

Error normal_dispatch_notify(BufferCore& buf, CudaStream& comm, const std::shared_ptr<DispatchWork>& work) {
  SY_TRY(begin_operation(buf, comm, "dispatch"));
  CudaBuffer& st = buffer_state(buf);
  DispatchWork& w = *work;
  DispatchHandle& h = *w.handle;
  auto op = std::make_shared<DispatchOp>();
  op->stream = comm.raw();
  SY_TRY(comm.rank_state_ref().reports->take(&op->report));

  // The handle's device state: new for a new routing, the original's for a cached one.
  if (!w.cached) {
    auto hs = std::make_shared<HandleState>();
    SY_TRY(sy::new_output(buf, core::DType::I32, {1}, &hs->state));
    if (st.sl.two_hop) SY_TRY(sy::new_output(buf, core::DType::I32, {int64_t(forward_words(buf.plan))}, &hs->forward));
    h.backend_state = hs;
  }
  if (!h.backend_state) return invalid("handle", "handle: comes from another backend");
  op->state = static_cast<HandleState*>(h.backend_state.get())->state;

  DispatchArgs& a = op->args;
  a.sync = sync_args(buf, w.epoch, st, op->report->device);
  a.xchg = st.d_xchg;
  a.own_xchg = st.own + st.sl.off_xchg;
  a.xl = st.xl;
  a.off_done = buf.plan.off_dispatch_epoch;
  core::dispatch_desc(a.desc, w.x_dtype, w.num_scales, w.scale_dtype, w.topk, w.num_experts, w.cached, false);
  a.pub.x = bytes_of(w.x);
  a.pub.x_stride = stride_bytes(w.x, 0);
  a.pub.scales = bytes_of(w.x_scales);
  a.pub.scale_st = stride_bytes(w.x_scales, 0);
  a.pub.scale_ss = stride_bytes(w.x_scales, 1);
  a.pub.topk_idx = bytes_of(w.topk_idx);
  a.pub.idx_st = stride_bytes(w.topk_idx, 0);
  a.pub.idx_sk = stride_bytes(w.topk_idx, 1);
  a.pub.idx_i64 = w.topk_idx && w.topk_idx->dtype == core::DType::I64 ? 1 : 0;
  a.pub.topk_w = bytes_of(w.topk_weights);
  a.pub.w_st = stride_bytes(w.topk_weights, 0);
  a.pub.w_sk = stride_bytes(w.topk_weights, 1);
  a.pub.tokens = w.num_tokens;
  a.pub.origin = st.own;
  a.shared_pub = a.pub;
  if (st.sl.staged) {  // the peers read the records the staging kernel writes (normal_kernels.h)
    const core::BufferPlan& p = buf.plan;
    a.stage = Staging{st.own + st.sl.off_records, p.record_bytes, p.rec_payload, p.rec_scales, p.rec_topk_idx,
                      p.rec_topk_weights, 0};
    Published& s = a.shared_pub;
    uint8_t* base = a.stage.base;
    s.x = base + p.rec_payload;
    s.x_stride = p.record_bytes;
    s.scales = a.pub.scales ? base + p.rec_scales : nullptr;
    s.scale_st = p.record_bytes;
    s.scale_ss = 4;
    s.topk_idx = a.pub.topk_idx ? base + p.rec_topk_idx : nullptr;
    s.idx_st = p.record_bytes;
    s.idx_sk = 4;
    s.idx_i64 = 0;
    s.topk_w = a.pub.topk_w ? base + p.rec_topk_weights : nullptr;
    s.w_st = p.record_bytes;
    s.w_sk = 4;
  }
  a.tokens = w.num_tokens;
  a.max_tokens = buf.plan.max_tokens_per_rank;
  a.topk = w.topk;
  a.experts = w.num_experts;
  a.local_experts = w.num_local_experts;
  a.cached = w.cached ? 1 : 0;
  a.layout = w.layout;
  a.alignment = w.expert_alignment;
  a.zero_padding = w.zero_padding ? 1 : 0;
  a.payload_bytes = w.payload_bytes;
  a.num_scales = w.num_scales;
  a.user_route = w.cached ? nullptr : bytes_of(w.is_token_in_rank);
  a.route_st = stride_bytes(w.is_token_in_rank, 0);
  a.route_sr = stride_bytes(w.is_token_in_rank, 1);
  a.h_route = h.is_token_in_rank->data();
  a.h_slot = reinterpret_cast<int32_t*>(h.send_slot->data());
  a.h_prefix = reinterpret_cast<int32_t*>(h.rank_prefix_matrix->data());
  a.h_state = reinterpret_cast<int32_t*>(op->state->data());
  a.h_topk = h.num_topk;
  // Worst-case and cached outputs exist already; exact-size ones are sized from the counts.
  a.out_rows = w.mode == DispatchMode::Exact ? -1 : w.out_rows;
  a.h_cap = w.mode == DispatchMode::Exact ? -1 : h.recv_capacity;
  a.cached_tokens = w.cached ? h.num_recv_tokens.load() : 0;
  a.cached_rows = w.cached ? h.num_rows : 0;
  a.ws = st.ws;
  if (st.sl.two_hop) {
    a.net = st.net;
    // A cached dispatch routes as its handle's did: the table stays as that one wrote it.
    if (!w.cached) a.fwd = forward_table(buf, *static_cast<HandleState*>(h.backend_state.get()));
  }

  const uint32_t epoch = w.epoch;
  const int rank = buf.rank;
  std::shared_ptr<ReportSlot> report = op->report;
  w.status->check_after = [report, rank, epoch, nic = nic_said(st)]() {
    return report_error(*report->host, rank, epoch, "dispatch", nic);
  };
  w.backend_state = op;
  // The report is sealed by the epilogue, or by the abandonment that follows a failure.
  bool exchanged = false;
  cudaError_t rc = launch_dispatch_notify(a, blocks_of(buf), comm.raw(), &exchanged);
  // Two hops: the network hop and the forwarding follow the exchange at once (the host's wait
  // for the counts does not hold them up).
  if (rc == cudaSuccess && a.net.relay != nullptr) {
    rc = launch_dispatch_network(a, comm.raw());
    // The peers wait for this rank's network hop: they hear at once that it will not come.
    if (rc != cudaSuccess) (void)launch_abandon(a.sync, -1, comm.raw());
  }
  w.peers_wait_for_it = exchanged;
  // Without the exchange nothing more follows: the report's end goes after what was launched
  // (with it, dispatch_abandon seals it), so it is not reused while those kernels may write it.
  if (rc != cudaSuccess && !exchanged) (void)op->report->seal(comm.raw());
  return cuda_error(rc, "dispatch: launching its first kernels");
}

Error normal_dispatch_wait_counts(DispatchWork& w, Deadline deadline) {
  auto* op = static_cast<DispatchOp*>(w.backend_state.get());
  const KernelReport& r = *op->report->host;
  // The one host wait of the data path: the counts usually land within microseconds of the
  // exchange, so the first millisecond polls without sleeping (a sleep lasts 50 us or more
  // with Linux's timer slack), yielding the core; then short naps. The deadline runs from the
  // exchange kernel's start: what is queued before it (the compute stream's work, which the
  // communication stream waits for) may take long and has deadlines of its own; a kernel that
  // has not even started after kNotStartedFactor deadlines is reported as such, and a stream
  // that failed before it (a sticky error) at once.
  constexpr double kNotStartedFactor = 3;
  const double start = now_seconds();
  double started = 0;  // when the host first saw the exchange kernel running
  double next_query = 0;
  uint32_t flag;
  while ((flag = __atomic_load_n(&r.counts_flag, __ATOMIC_ACQUIRE)) == 0) {
    const double now = now_seconds();
    if (!started && __atomic_load_n(&r.exchange_started, __ATOMIC_ACQUIRE)) started = now;
    const double limit = deadline.ms_total / 1e3 * (started ? 1 : kNotStartedFactor);
    if (now - (started ? started : start) > limit) {
      core::WaitFailure f;
      f.rank = w.rank;
      f.role = core::WaitRole::HostCounter;
      f.waited_seconds = now - start;
      return timeout_error(f, started ? "the exchange kernel of dispatch " + std::to_string(w.epoch) + " did not report"
                                      : "the exchange kernel of dispatch " + std::to_string(w.epoch) +
                                            " did not start: the work queued before it (on the compute stream "
                                            "the communication stream waits for) has not finished");
    }
    if (now - start < 1e-3) {
      std::this_thread::yield();
      continue;
    }
    if (!started && now >= next_query) {  // once a millisecond: the query takes the driver's locks
      next_query = now + 1e-3;
      const cudaError_t q = cudaStreamQuery(op->stream);
      if (q != cudaSuccess && q != cudaErrorNotReady) {
        return cuda_error(q, ("dispatch: the communication stream failed before the exchange kernel of dispatch " +
                              std::to_string(w.epoch) + " ran")
                                 .c_str());
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(10));
  }
  if (flag != 1u) {
    Error e = report_error(r, w.rank, w.epoch, "dispatch");
    return e ? e : fail(SY_ERROR_INTERNAL, "dispatch: the exchange failed without a report");
  }
  w.num_recv_tokens = r.num_recv;
  w.expert_counts_exact.assign(r.expert_counts, r.expert_counts + (w.topk > 0 ? w.num_local_experts : 0));
  return ok();
}

Error normal_dispatch_epilogue(BufferCore& buf, CudaStream& comm, const std::shared_ptr<DispatchWork>& work) {
  DispatchWork& w = *work;
  DispatchHandle& h = *w.handle;
  auto op = std::static_pointer_cast<DispatchOp>(w.backend_state);
  DispatchArgs& a = op->args;
  a.out_rows = w.out_rows;
  a.h_cap = h.recv_capacity;
  a.h_src_idx = reinterpret_cast<int32_t*>(h.recv_src_idx->data());
  a.h_src_rank = reinterpret_cast<int32_t*>(h.recv_src_rank->data());
  a.h_exp_row = h.expanded_row ? reinterpret_cast<int32_t*>(h.expanded_row->data()) : nullptr;
  a.recv_x = w.recv_x->data();
  a.recv_scales = w.recv_x_scales ? w.recv_x_scales->data() : nullptr;
  a.recv_idx = w.recv_topk_idx ? w.recv_topk_idx->data() : nullptr;
  a.recv_idx_i64 = w.recv_topk_idx && w.recv_topk_idx->dtype == core::DType::I64 ? 1 : 0;
  a.recv_w = w.recv_topk_weights ? reinterpret_cast<float*>(w.recv_topk_weights->data()) : nullptr;
  a.recv_count = reinterpret_cast<int32_t*>(w.recv_count->data());
  SY_CUDA(cudaSetDevice(comm.rank_state_ref().device));
  if (a.cached && a.layout == SY_LAYOUT_EXPANDED && a.zero_padding) {
    // The rows a cached expanded dispatch leaves unwritten are the padding (the handle knows
    // the groups, not their counts): zeroed before the rows arrive, on request.
    SY_CUDA(cudaMemsetAsync(a.recv_x, 0, size_t(a.out_rows) * size_t(a.payload_bytes), comm.raw()));
    if (a.recv_scales) {
      SY_CUDA(cudaMemsetAsync(a.recv_scales, 0, size_t(a.out_rows) * size_t(a.num_scales) * 4, comm.raw()));
    }
  }
  SY_CUDA(launch_dispatch_receive(a, blocks_of(buf), comm.raw()));
  SY_TRY(op->report->seal(comm.raw()));
  if (!w.cached) {
    // The handle learns its outcome once the dispatch is over (asked by combine, a cached
    // dispatch, or its info).
    std::shared_ptr<ReportSlot> report = op->report;
    const int rank = buf.rank;
    const uint32_t epoch = w.epoch;
    std::lock_guard<std::mutex> l(h.mu);
    h.settle = [report, rank, epoch](DispatchHandle& hh) {
      if (!report->complete()) return;
      const KernelReport& r = *report->host;
      const bool failed = report_error(r, rank, epoch, "dispatch").status != SY_OK;
      if (!failed) hh.num_recv_tokens.store(r.num_recv);
      hh.state.store(failed ? 2 : 1);
      std::lock_guard<std::mutex> l2(hh.mu);
      hh.settle = nullptr;
    };
  }
  w.backend_state.reset();
  return ok();
}

void normal_dispatch_abandon(BufferCore& buf, CudaStream& comm, const std::shared_ptr<DispatchWork>& work) {
  auto op = std::static_pointer_cast<DispatchOp>(work->backend_state);
  if (!op) return;
  cudaSetDevice(comm.rank_state_ref().device);
  // The handshake still runs (the peers may be reading this rank's inputs); nothing else. The
  // report's end is recorded whatever happens, after all that was launched.
  (void)launch_dispatch_abandon(op->args, comm.raw());
  (void)op->report->seal(comm.raw());
  work->backend_state.reset();
}

Error normal_combine(BufferCore& buf, CudaStream& comm, const std::shared_ptr<CombineWork>& work) {
  SY_TRY(begin_operation(buf, comm, "combine"));
  CudaBuffer& st = buffer_state(buf);
  CombineWork& w = *work;
  DispatchHandle& h = *w.handle;
  if (!h.backend_state) return invalid("handle", "handle: comes from another backend");
  std::shared_ptr<ReportSlot> report;
  SY_TRY(comm.rank_state_ref().reports->take(&report));
  CombineArgs a;
  a.sync = sync_args(buf, w.epoch, st, report->device);
  a.xchg = st.d_xchg;
  a.xl = st.xl;
  a.off_done = buf.plan.off_combine_epoch;
  core::combine_desc(a.desc, w.topk, w.internode_reduction, false);
  a.pub.cx = w.x->data();
  a.pub.cx_stride = stride_bytes(w.x, 0);
  a.pub.cw = bytes_of(w.topk_weights);
  a.pub.cw_st = stride_bytes(w.topk_weights, 0);
  a.pub.cw_sk = stride_bytes(w.topk_weights, 1);
  a.pub.expanded_row = h.expanded_row ? reinterpret_cast<const int32_t*>(h.expanded_row->data()) : nullptr;
  a.pub.expanded_k = h.layout == SY_LAYOUT_EXPANDED ? h.num_topk : 0;
  a.pub.c_rows = w.x->shape[0];
  a.pub.c_tokens = h.recv_capacity;
  a.pub.origin = st.own;
  a.shared_pub = a.pub;
  if (st.sl.staged) {  // the peers read the rows the staging kernel writes, in the compact form
    const core::BufferPlan& p = buf.plan;
    // The rows that can arrive; once the dispatch has reported, only those it received (a
    // worst-case output's tail is never read).
    int64_t rows = std::min<int64_t>(a.pub.expanded_k == 0 ? a.pub.c_rows : a.pub.c_tokens, p.max_recv_rows());
    if (const int64_t received = h.num_recv_tokens.load(); received >= 0) rows = std::min(rows, received);
    a.stage = Staging{st.own + st.sl.off_rows, p.combine_row_bytes, p.row_payload, 0, 0, p.row_topk_weights, rows};
    Published& s = a.shared_pub;
    s.cx = a.stage.base + p.row_payload;
    s.cx_stride = p.combine_row_bytes;
    s.cw = a.pub.cw ? a.stage.base + p.row_topk_weights : nullptr;
    s.cw_st = p.combine_row_bytes;
    s.cw_sk = 4;
    s.expanded_row = nullptr;
    s.expanded_k = 0;
    s.c_rows = rows;
    s.c_tokens = rows;
  }
  a.tokens = h.num_tokens;
  a.hidden = w.hidden;
  a.topk = w.topk;
  a.h_topk = h.num_topk;
  a.h_state = reinterpret_cast<const int32_t*>(static_cast<HandleState*>(h.backend_state.get())->state->data());
  a.h_slot = reinterpret_cast<const int32_t*>(h.send_slot->data());
  a.h_prefix = reinterpret_cast<const int32_t*>(h.rank_prefix_matrix->data());
  a.bias0 = bytes_of(w.bias0);
  a.bias0_stride = stride_bytes(w.bias0, 0);
  a.bias1 = bytes_of(w.bias1);
  a.bias1_stride = stride_bytes(w.bias1, 0);
  a.out = w.out->data();
  a.out_stride = stride_bytes(w.out, 0);
  a.out_w = w.out_topk_weights ? reinterpret_cast<float*>(w.out_topk_weights->data()) : nullptr;
  a.ws = st.ws;
  if (st.sl.two_hop) {
    a.net = st.net;
    a.fwd = forward_table(buf, *static_cast<HandleState*>(h.backend_state.get()));
    if (a.fwd.base == nullptr) return invalid("handle", "handle: comes from a dispatch that did not take two hops here");
    a.hierarchical = w.internode_reduction == SY_INTERNODE_HIERARCHICAL ? 1 : 0;
    a.shared_pub.chain_starts = a.pub.chain_starts = (a.bias0 != nullptr || a.bias1 != nullptr) ? 1 : 0;
  }
  const uint32_t epoch = w.epoch;
  const int rank = buf.rank;
  w.status->check_after = [report, rank, epoch, dispatched = h.status, nic = nic_said(st)]() {
    Error e = report_error(*report->host, rank, epoch, "combine", nic);
    // Refused for a failed dispatch (which ran before it on this stream): that failure, naming its peer.
    if (e && report->host->fail_kind == int32_t(KernelFailure::DispatchFailed) && dispatched) {
      e = failed_handle_error(dispatched->result());
    }
    return e;
  };
  bool exchanged = false;
  const cudaError_t rc = launch_combine(a, blocks_of(buf), comm.raw(), &exchanged);
  w.peers_wait_for_it = exchanged;
  if (exchanged) SY_TRY(report->seal(comm.raw()));
  return cuda_error(rc, "combine: launching its kernels");
}

}  // namespace sy::cuda
