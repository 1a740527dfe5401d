#include "objects.h"

#include <chrono>

namespace sy {

void dense_strides(int ndim, const int64_t* shape, int64_t* strides) {
  int64_t s = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i] > 0 ? shape[i] : 1;
  }
}

GroupCore::~GroupCore() {
  if (nccl_comm && nccl_destroy) nccl_destroy(nccl_comm);
  ranks.clear();  // rank backend state first, the backend last
  backend.reset();
}

RankCore& BufferCore::rank_core() const { return *group->rank_by_index(rank); }

uint32_t* BufferCore::mask() const {
  return reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(region->ptr) + plan.off_mask);
}

Error Backend::mask_write(BufferCore& buf, int first, int count, uint32_t value) {
  for (int r = first; r < first + count; ++r) __atomic_store_n(&buf.mask()[r], value, __ATOMIC_RELEASE);
  return ok();
}

Error Backend::mask_read(BufferCore& buf, uint32_t* out, int n) {
  for (int r = 0; r < n; ++r) out[r] = __atomic_load_n(&buf.mask()[r], __ATOMIC_ACQUIRE);
  return ok();
}

void DispatchWork::publish_counts(Error e) {
  std::lock_guard<std::mutex> l(mu);
  counts_state = e ? 2 : 1;
  counts_error = std::move(e);
  cv.notify_all();
}

Error DispatchWork::wait_counts(Deadline deadline, int waiter_rank) {
  std::unique_lock<std::mutex> l(mu);
  double start = now_seconds();
  while (counts_state == 0) {
    double left = deadline.remaining_seconds();
    if (left <= 0) {
      core::WaitFailure w;
      w.rank = waiter_rank;
      w.role = core::WaitRole::HostCounter;
      w.waited_seconds = now_seconds() - start;
      return timeout_error(w, "the communication stream never ran the dispatch; is it blocked?");
    }
    cv.wait_for(l, std::chrono::duration<double>(left));
  }
  return counts_state == 1 ? ok() : counts_error;
}

}  // namespace sy
