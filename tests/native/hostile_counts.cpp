// A peer that announces counts no honest rank could: the host backend's dispatch must refuse
// them before they index a region (csrc/host/host_ops.cpp, notify), naming the peer and the
// count, and must never read or write outside a buffer because of them. Counts come from the
// peers' side of shared memory (another process, perhaps), so they are input from outside.
//
// Rank 0 runs the real protocol code on two ranks' buffers in plain memory; rank 1 is played by
// this program: it arrives at the barrier with matching parameters, then writes what it
// "sends" into rank 0's header and raises its flag, as Peers::signal does.
//
//   tokens for a rank    more than max_tokens_per_rank, and negative
//   tokens for an expert more than max_tokens_per_rank
//   honest counts        the same setup with counts a real rank could send: accepted (the
//                        harness itself is sound)
//
// Deterministic; prints one line per case and exits non-zero on a failure. Under
// AddressSanitizer (CI's address lane) an access outside the buffers stops it.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../../csrc/core/op_desc.h"
#include "../../csrc/core/plan.h"
#include "../../csrc/host/host_ops.h"
#include "../../csrc/host/peers.h"

namespace {

using sy::core::DType;

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  if (!ok) failures += 1;
}

constexpr int kRanks = 2, kHidden = 64, kMaxTokens = 8, kTokens = 6, kTopk = 2, kExperts = 4;

std::shared_ptr<sy::Tensor> host_tensor(DType dtype, std::initializer_list<int64_t> shape) {
  auto t = std::make_shared<sy::Tensor>();
  t->dtype = dtype;
  t->ndim = int(shape.size());
  int i = 0;
  for (int64_t s : shape) t->shape[i++] = s;
  sy::dense_strides(t->ndim, t->shape, t->strides);
  t->memory = std::make_shared<sy::Memory>();
  t->memory->bytes = t->dense_bytes();
  t->memory->ptr = std::calloc(1, size_t(t->memory->bytes) + 1);
  t->memory->release = [](void* p) { std::free(p); };
  return t;
}

struct Harness {
  sy::BufferSet set{kRanks};
  std::vector<std::unique_ptr<uint8_t[]>> memory;
  sy::DispatchWork w;

  Harness() {
    if (!sy::core::plan_buffer(kRanks, kHidden, kMaxTokens, 0, &set.plan).ok()) std::abort();
    for (int r = 0; r < kRanks; ++r) {
      memory.emplace_back(new uint8_t[set.plan.total_bytes]());
      set.bases[size_t(r)] = memory.back().get();
    }
    set.joined = kRanks;
    // Rank 0's dispatch: every token to expert 0 (rank 0) and expert 2 (rank 1).
    w.rank = 0;
    w.num_ranks = kRanks;
    w.epoch = 1;
    w.num_tokens = kTokens;
    w.hidden = kHidden;
    w.payload_bytes = 2 * kHidden;
    w.topk = kTopk;
    w.num_experts = kExperts;
    w.num_local_experts = kExperts / kRanks;
    w.x = host_tensor(DType::BF16, {kTokens, kHidden});
    w.topk_idx = host_tensor(DType::I64, {kTokens, kTopk});
    w.topk_weights = host_tensor(DType::F32, {kTokens, kTopk});
    for (int t = 0; t < kTokens; ++t) {
      *w.topk_idx->at<int64_t>(t, 0) = 0;
      *w.topk_idx->at<int64_t>(t, 1) = 2;
    }
    w.handle = std::make_shared<sy::DispatchHandle>();
    w.handle->is_token_in_rank = host_tensor(DType::Bool, {kTokens, kRanks});
    w.handle->send_slot = host_tensor(DType::I32, {kTokens, kRanks});
  }
  uint32_t* word(int owner, uint64_t off) { return reinterpret_cast<uint32_t*>(set.bases[size_t(owner)] + off); }
  int32_t* i32(int owner, uint64_t off) { return reinterpret_cast<int32_t*>(set.bases[size_t(owner)] + off); }

  // Rank 1 arrives at rank 0's barrier with rank 0's parameters, as Peers::barrier does.
  void arrive() {
    const sy::core::BufferPlan& p = set.plan;
    uint32_t desc[sy::core::kDescWords];
    sy::core::dispatch_desc(desc, DType::BF16, 0, DType::F32, kTopk, kExperts, false, false);
    *word(0, sy::core::op_slot(p.off_op_kind, kRanks, 1, w.epoch, 1)) = desc[0];
    uint32_t* slot = word(0, sy::core::op_slot(p.off_op_desc, kRanks, 1, w.epoch, sy::core::kDescSlotWords));
    for (int i = 0; i < sy::core::kDescWords; ++i) slot[i] = desc[i];
    slot[sy::core::kDescEpoch] = w.epoch;
    __atomic_store_n(word(0, p.off_barrier_epoch + 4ull), w.epoch, __ATOMIC_RELEASE);
  }
  // Rank 1 "sends" rank 0 what the counts say: per destination rank, and per local expert of
  // rank 0; then raises its dispatch flag in rank 0's header.
  void announce(int32_t to_rank0, int32_t to_rank1, int32_t expert0, int32_t expert1) {
    const sy::core::BufferPlan& p = set.plan;
    int32_t* row = i32(0, p.off_send_counts) + kRanks;  // rank 1's row
    row[0] = to_rank0;
    row[1] = to_rank1;
    int32_t* er = i32(0, p.off_expert_counts) + sy::core::kMaxExpertsPerRank;
    er[0] = expert0;
    er[1] = expert1;
    __atomic_store_n(word(0, p.off_dispatch_epoch + 4ull), w.epoch, __ATOMIC_RELEASE);
  }
  sy::Error run() { return sy::host::run_dispatch_notify(set, 500, w); }
};

void refused(const char* what, int32_t to_rank0, int32_t to_rank1, int32_t expert0, int32_t expert1,
             const std::string& expected) {
  Harness h;
  h.arrive();
  h.announce(to_rank0, to_rank1, expert0, expert1);
  const sy::Error e = h.run();
  check(e.status == SY_ERROR_INTERNAL && e.message.find(expected) != std::string::npos,
        std::string(what) + ": " + (e ? e.message : std::string("accepted")));
}

}  // namespace

int main() {
  refused("more tokens for a rank than a buffer holds", 1000000, 0, 0, 0,
          "rank 1 announced 1000000 tokens for rank 0, outside 0..8");
  refused("a negative count for a rank", 3, -5, 3, 0, "rank 1 announced -5 tokens for rank 1, outside 0..8");
  refused("more tokens for a local expert than a buffer holds", 3, 0, 3, 1 << 30,
          "rank 1 announced 1073741824 tokens for local expert 1, outside 0..8");
  {
    Harness h;
    h.arrive();
    h.announce(3, 2, 3, 0);  // three tokens for rank 0's expert 0
    const sy::Error e = h.run();
    check(e.ok() && h.w.num_recv_tokens == kTokens + 3,
          "honest counts are accepted: " + std::to_string(h.w.num_recv_tokens) + " tokens received" +
              (e ? " (" + e.message + ")" : ""));
  }
  std::printf("hostile_counts: %s\n", failures == 0 ? "every case passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
