// The host backend: CPU memory, one worker thread per stream, and the normal-mode operations
// run as stream tasks (host_ops.cpp).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "../abi/strided.h"
#include "host_ll.h"
#include "peers.h"
#include "shared_memory.h"
#include "host_ops.h"
#include "host_stream.h"

namespace sy {

namespace {

// Large allocations are anonymous mappings: zero pages the kernel commits on first touch, so a
// buffer sized for the worst case costs only what an operation actually writes.
constexpr uint64_t kMapThreshold = uint64_t(1) << 20;

// Operation outputs come and go with every call, at a few recurring sizes. A fresh mapping is
// faulted in page by page, which costs more than writing the pages (most of a host dispatch's
// time went to page faults; in a virtual machine a first touch is dearer still): freed mappings
// are kept and handed out again. Sizes are rounded up to an eighth of their power of two, so near
// sizes share mappings. An output the operation writes entirely comes back zeroed; one it writes
// only in part (a low-latency receive buffer or a worst-case dispatch's rows, sized for the
// worst case) comes back as it was left, as CUDA's pool gives memory (the payload past what a call writes is undefined on both
// backends): zeroing it would commit every page the call leaves alone. What the pool keeps is
// bounded by the pages actually resident (mincore), not by the mappings' sizes, so a worst-case
// mapping with a few rows written costs what those rows cost.
class MappingPool {
 public:
  static constexpr size_t kMappings = 64;
  // An eighth of the machine's memory, at least 1 GiB: 8 virtual ranks of a prefill-sized
  // dispatch hold several outputs of ~100 MiB each. Per process: it holds only what the process
  // freed recently, so a rank per process keeps about one rank's outputs.
  const uint64_t kResidentBytes = std::max<uint64_t>(
      uint64_t(1) << 30, uint64_t(std::max(0L, sysconf(_SC_PHYS_PAGES))) * uint64_t(sysconf(_SC_PAGESIZE)) / 8);

  static uint64_t size_class(uint64_t bytes) {
    uint64_t top = 4096;
    while (top < bytes) top <<= 1;
    const uint64_t step = std::max<uint64_t>(top / 8, 4096);
    return core::align_up(bytes, step);
  }
  // A kept mapping of exactly `size` bytes (zeroed if asked), the most recently given back;
  // nullptr when there is none.
  void* take(uint64_t size, bool zeroed) {
    void* p = nullptr;
    uint64_t resident = 0;
    {
      std::lock_guard<std::mutex> l(mu_);
      for (auto it = kept_.rbegin(); it != kept_.rend(); ++it) {
        if (it->size != size) continue;
        p = it->ptr;
        resident = it->resident;
        resident_ -= it->resident;
        kept_.erase(std::next(it).base());
        break;
      }
    }
    if (p != nullptr && zeroed) {
      // Mostly committed: clearing in place keeps the pages. Mostly not (a worst-case buffer a
      // call barely touched): dropping the pages costs what was committed, where a memset would
      // commit all of it; they read as zeros again, as in a fresh mapping.
      if (2 * resident >= size || madvise(p, size, MADV_DONTNEED) != 0) std::memset(p, 0, size);
    }
    return p;
  }
  // Keeps a mapping; the oldest kept ones go once the pool is over its bounds, so the sizes a
  // program uses now stay (a benchmark's earlier, larger shapes do not crowd out its later ones).
  void give(void* p, uint64_t size) {
    const uint64_t resident = resident_bytes(p, size);
    std::vector<Kept> dropped;
    {
      std::lock_guard<std::mutex> l(mu_);
      kept_.push_back(Kept{p, size, resident});
      resident_ += resident;
      while (!kept_.empty() && (kept_.size() > kMappings || resident_ > kResidentBytes)) {
        resident_ -= kept_.front().resident;
        dropped.push_back(kept_.front());
        kept_.erase(kept_.begin());
      }
    }
    for (const Kept& k : dropped) munmap(k.ptr, k.size);
  }

 private:
  struct Kept {
    void* ptr;
    uint64_t size;
    uint64_t resident;
  };
  // Pages of [p, p + size) in memory; all of them when the kernel cannot say.
  static uint64_t resident_bytes(void* p, uint64_t size) {
    static const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
    std::vector<unsigned char> in(size_t((size + page - 1) / page));
    if (mincore(p, size, in.data()) != 0) return size;
    uint64_t n = 0;
    for (unsigned char c : in) n += c & 1;
    return n * page;
  }

  std::mutex mu_;
  std::vector<Kept> kept_;  // oldest first
  uint64_t resident_ = 0;
};

MappingPool& mapping_pool() {
  static MappingPool& pool = *new MappingPool;  // never destroyed: outputs may be freed at exit
  return pool;
}

// `zeroed`: whether the memory must read as zeros (buffers, and outputs written entirely, which
// the pool hands back zeroed) or may hold what an earlier output left (outputs written in part).
Error host_alloc(uint64_t bytes, std::shared_ptr<Memory>* out, bool zeroed = true) {
  auto m = std::make_shared<Memory>();
  m->device = -1;
  if (bytes >= kMapThreshold) {
    const uint64_t size = MappingPool::size_class(bytes);
    void* p = mapping_pool().take(size, zeroed);
    if (p == nullptr) {
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) {
        return fail(SY_ERROR_OUT_OF_MEMORY, "host mapping of " + std::to_string(bytes) + " bytes failed");
      }
    }
    m->ptr = p;
    m->bytes = size;
    m->release = [size](void* q) { mapping_pool().give(q, size); };
  } else {
    // 64-byte alignment covers 16-byte vector access and keeps rows off shared cache lines.
    const uint64_t size = core::align_up(bytes == 0 ? 64 : bytes, 64);
    void* p = std::aligned_alloc(64, size);
    if (p == nullptr) {
      return fail(SY_ERROR_OUT_OF_MEMORY, "host allocation of " + std::to_string(bytes) + " bytes failed");
    }
    // Memory an output leaves undefined reads as 0xCB (as on the CPU-executed CUDA backend), so
    // code that relies on zeros there fails in every small test instead of by chance.
    std::memset(p, zeroed ? 0 : 0xCB, size);
    m->ptr = p;
    m->bytes = size;
    m->release = [](void* q) { std::free(q); };
  }
  *out = std::move(m);
  return ok();
}

host::HostStream* as_host(Stream& s) { return dynamic_cast<host::HostStream*>(&s); }

class HostBackend final : public Backend {
 public:
  sy_backend kind() const override { return SY_BACKEND_HOST; }
  bool dispatch_supported() const override { return true; }

  Error init_rank(GroupCore&, RankCore& rank) override {
    rank.device = -1;
    return ok();
  }

  Error allocate(RankCore&, uint64_t bytes, std::shared_ptr<Memory>* out) override {
    return host_alloc(bytes, out);
  }

  Error allocate_output(RankCore&, Stream&, uint64_t bytes, OutputWritten written,
                        std::shared_ptr<Memory>* out) override {
    return host_alloc(bytes, out, written == OutputWritten::Entirely);
  }

  Error allocate_shared(RankCore& rank, uint64_t bytes, std::shared_ptr<Memory>* out) override {
    // Virtual ranks share one address space: plain memory is visible to every peer. Ranks in
    // other processes map a named segment.
    return rank.group->process_group ? host::create_segment(bytes, out) : host_alloc(bytes, out);
  }

  Error import_shared(RankCore&, const std::string& name, uint64_t bytes, const core::BufferPlan&,
                      std::shared_ptr<Memory>* out) override {
    return host::open_segment(name, bytes, out);
  }

  Error seal_shared(Memory& memory) override { return host::unlink_segment(memory); }

  Error bind_thread(RankCore&) override { return ok(); }

  Error nccl_usable() const override {
    return fail(SY_ERROR_UNSUPPORTED, "the host backend moves data through shared memory and does not use NCCL");
  }

  Error create_stream(std::shared_ptr<GroupCore> g, RankCore& rank,
                      std::shared_ptr<Stream>* out) override {
    int64_t timeout = g->timeout_ms;
    *out = std::make_shared<host::HostStream>(std::move(g), rank.index, timeout);
    return ok();
  }

  Error create_event(std::shared_ptr<GroupCore> g, RankCore& rank, std::shared_ptr<Event>* out,
                     bool /*timed: the host's clock costs nothing*/) override {
    *out = std::make_shared<host::HostEvent>(std::move(g), rank.index);
    return ok();
  }

  Error write_tensor(Stream& s, std::shared_ptr<Tensor> t, const void* src,
                     Deadline deadline) override {
    return as_host(s)->run_and_wait(
        [t, src]() -> Error {
          dense_to_strided(*t, static_cast<const uint8_t*>(src), t->data());
          return ok();
        },
        deadline);
  }

  Error read_tensor(Stream& s, std::shared_ptr<Tensor> t, void* dst, Deadline deadline) override {
    return as_host(s)->run_and_wait(
        [t, dst]() -> Error {
          // The operation that fills the tensor ran before this copy (stream order): if it
          // failed, its data is garbage and the read says why.
          if (t->producer) SY_TRY(t->producer->result());
          strided_to_dense(*t, t->data(), static_cast<uint8_t*>(dst));
          return ok();
        },
        deadline);
  }

  Error copy_tensor(Stream& s, std::shared_ptr<Tensor> dst, std::shared_ptr<Tensor> src) override {
    as_host(s)->enqueue([dst, src](host::StreamState&) -> Error {
      std::memcpy(dst->data(), src->data(), size_t(src->dense_bytes()));
      return ok();
    });
    return ok();
  }

  Error layout(Stream& comm, std::shared_ptr<LayoutWork> work) override {
    as_host(comm)->enqueue([work](host::StreamState&) { return host::run_layout(*work); }, work->status);
    return ok();
  }

  Error dispatch_notify(BufferCore& buf, Stream& comm,
                        std::shared_ptr<DispatchWork> work) override {
    std::shared_ptr<BufferSet> set = buf.set;
    int64_t timeout = buf.timeout_ms;
    as_host(comm)->enqueue(
        [set, timeout, work](host::StreamState&) { return host::run_dispatch_notify(*set, timeout, *work); },
        work->status);
    return ok();
  }

  Error abandon(BufferCore& buf, int peer) override {
    Error why = fail(SY_ERROR_PEER_FAILED, "rank " + std::to_string(peer) + " failed");
    why.wait.peer = peer;
    why.wait.role = core::WaitRole::BufferPeers;
    host::Peers(*buf.set, buf.rank, buf.timeout_ms, buf.next_epoch).abort_all(why);
    return ok();
  }

  Error reject(BufferCore& buf, Stream& comm, core::OpKind kind, uint32_t epoch) override {
    std::shared_ptr<BufferSet> set = buf.set;
    const int rank = buf.rank;
    const int64_t timeout = buf.timeout_ms;
    // Its own status: the refusal was already reported to the caller.
    as_host(comm)->enqueue(
        [set, rank, timeout, epoch, kind](host::StreamState&) {
          return host::run_reject(*set, rank, timeout, epoch, kind);
        },
        std::make_shared<OpStatus>());
    return ok();
  }

  Error dispatch_wait_counts(DispatchWork& work, Deadline deadline) override {
    return work.wait_counts(deadline, work.rank);
  }

  Error dispatch_epilogue(BufferCore& buf, Stream& comm,
                          std::shared_ptr<DispatchWork> work) override {
    std::shared_ptr<BufferSet> set = buf.set;
    as_host(comm)->enqueue([set, work](host::StreamState&) { return host::run_dispatch_epilogue(*set, *work); },
                           work->status);
    return ok();
  }

  Error ll_dispatch_send(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) override {
    return ll_stage(buf, s, work, host::run_ll_dispatch_send);
  }
  Error ll_dispatch_recv(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) override {
    return ll_stage(buf, s, work, host::run_ll_dispatch_recv);
  }
  Error ll_combine_send(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) override {
    return ll_stage(buf, s, work, host::run_ll_combine_send);
  }
  Error ll_combine_recv(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work) override {
    return ll_stage(buf, s, work, host::run_ll_combine_recv);
  }
  Error ll_reject(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work, bool dispatch) override {
    return ll_stage(buf, s, std::move(work), dispatch ? host::run_ll_dispatch_reject : host::run_ll_combine_reject);
  }
  Error ll_clean(BufferCore& buf, Stream& s, uint32_t epoch, std::shared_ptr<OpStatus> status) override {
    std::shared_ptr<BufferSet> set = buf.set;
    int rank = buf.rank;
    int64_t timeout = buf.timeout_ms;
    bool masking = buf.masking;
    as_host(s)->enqueue([set, rank, timeout, masking, epoch](
                            host::StreamState&) { return host::run_ll_clean(*set, rank, timeout, masking, epoch); },
                        std::move(status));
    return ok();
  }

  Error combine(BufferCore& buf, Stream& comm, std::shared_ptr<CombineWork> work) override {
    std::shared_ptr<BufferSet> set = buf.set;
    int64_t timeout = buf.timeout_ms;
    as_host(comm)->enqueue(
        [set, timeout, work](host::StreamState&) { return host::run_combine(*set, timeout, *work); }, work->status);
    return ok();
  }

 private:
  using LLStage = Error (*)(BufferSet&, LLWork&);
  static Error ll_stage(BufferCore& buf, Stream& s, std::shared_ptr<LLWork> work, LLStage run) {
    std::shared_ptr<BufferSet> set = buf.set;
    as_host(s)->enqueue([set, work, run](host::StreamState&) { return run(*set, *work); }, work->status);
    return ok();
  }
};

}  // namespace

std::unique_ptr<Backend> make_host_backend() { return std::make_unique<HostBackend>(); }

}  // namespace sy
