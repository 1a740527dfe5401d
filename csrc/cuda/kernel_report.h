// What a CUDA operation tells the host: bad input, why it gave up, and (for exact-size dispatch)
// the received counts. Kernels cannot return errors, so each operation takes one record in
// mapped pinned memory (a ring per rank), fills it from the device and the host reads it once the
// operation's work has completed, or earlier for the counts. Every part has a flag written last
// with a release store, so a reader never sees half a record.
#pragma once

#include <cstdint>

#include "../core/failure.h"
#include "../core/limits.h"
#include "transport/proxy_ring.h"
#include "transport/rdma.h"

namespace sy::cuda {

// Why an operation failed on the device. The host turns each into the same error the host
// backend reports for it (kernel_report.cu).
enum class KernelFailure : int32_t {
  None = 0,
  Timeout = 1,          // waited for `peer` in `role`: flag `observed`, wanted `expected`
  PeerAborted = 2,      // rank `peer` gave up (its abort record: a = its peer, b = role, c = status)
  PeerRejected = 3,     // rank `peer` rejected its own input
  KindMismatch = 4,     // rank `peer` called operation kind `observed`, this rank `expected`
  DescMismatch = 5,     // rank `peer` passed `observed` for parameter word `a`, this rank `expected`
  CachedMismatch = 6,   // the cached handle expects `expected` rows, the peers sent `observed`
  Capacity = 7,         // `observed` rows arrived, the outputs hold `expected`
  DispatchFailed = 8,   // combine: the handle's dispatch did not complete
  Internal = 9,         // the peers' counts disagree with what arrived (`a` = local expert)
  NotRun = 10,          // an earlier kernel of the operation failed (never reported alone)
  HandleMismatch = 11,  // combine: rank `peer` holds no row `observed` (its handle has `expected`)
  PeerMovedOn = 12,     // rank `peer`'s parameters for operation `expected` were overwritten by `observed`
};

// An Internal failure of a network kernel's transport call (a = -4, b = its TransportResult,
// c = the proxy's Refusal): whether it was the NIC failing a put to rank `peer`, the peer's or
// the network's doing rather than ours. The error (kernel_report.cu) and what the peers are told
// (network_state.cuh) both say so.
SY_HD bool nic_failed_put(int32_t a, int32_t b, int32_t c) {
  return a == -4 && b == int32_t(transport::TransportResult::Refused) &&
         transport::Refusal(c) == transport::Refusal::Device;
}

struct KernelReport {
  // Bad top-k entries (the first one wins).
  core::InputProblem problem;
  // The operation's failure (the first one wins): 0 none, -1 being written, 1 set.
  int32_t fail_flag;
  int32_t fail_kind;  // KernelFailure
  int32_t peer;
  int32_t role;       // core::WaitRole
  int64_t expected;
  int64_t observed;
  int64_t waited_ns;
  int32_t a, b, c, reserved;
  // Exact-size dispatch: the exchange kernel has started (1), so the host's wait for the counts
  // runs its deadline from here; then 0 pending, 1 ready, 2 failed (see fail_*).
  uint32_t exchange_started;
  uint32_t counts_flag;
  int32_t num_local_experts;
  int64_t num_recv;   // rows received (tokens)
  int32_t expert_counts[core::kMaxExpertsPerRank];  // per local expert, unaligned
  // A low-latency timeout: bit r set for every rank still missing at the deadline (the report
  // names the lowest in `peer`), written before the failure's flag.
  uint32_t missing[core::kMaxRanks / 32];
};

}  // namespace sy::cuda
