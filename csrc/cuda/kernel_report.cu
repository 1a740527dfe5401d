// A kernel report (kernel_report.h) as the error the operation fails with: the same errors,
// worded the same way, as the host backend raises for the same situations.
#include <functional>
#include <string>

#include "../abi/protocol_errors.h"
#include "../core/op_desc.h"
#include "../core/routing.h"
#include "cuda_objects.h"
#include "transport/proxy_ring.h"
#include "transport/rdma.h"

namespace sy::cuda {

namespace {

uint32_t load_flag(const int32_t* p) { return uint32_t(__atomic_load_n(p, __ATOMIC_ACQUIRE)); }

Error problem_error(const core::InputProblem& p) {
  return topk_problem_error(core::TopkProblem(p.kind), p.token, p.entry, p.value, p.experts);
}

}  // namespace

Error timeout_report_error(const KernelReport& r, int rank, uint32_t epoch) {
  std::string missing;
  int listed = 0, more = 0;
  for (int p = 0; p < core::kMaxRanks; ++p) {
    if (!(r.missing[p / 32] >> (p % 32) & 1u)) continue;
    if (listed < 16) {
      missing += (missing.empty() ? "" : ", ") + std::to_string(p);
      ++listed;
    } else {
      ++more;
    }
  }
  if (missing.empty()) missing = std::to_string(r.peer);  // a wait that records the one it named
  core::WaitFailure w;
  w.rank = rank;
  w.peer = r.peer;
  w.role = core::WaitRole(r.role);
  w.channel = r.peer;
  w.expected = r.expected;
  w.observed = r.observed;
  w.waited_seconds = double(r.waited_ns) * 1e-9;
  return missing_ranks_error(w, epoch, missing + (more ? ", ..." : ""));
}

Error report_error(const KernelReport& r, int rank, uint32_t epoch, const char* op,
                   const std::function<std::string()>& nic_said) {
  if (load_flag(&r.problem.flag) == 1u) return problem_error(r.problem);
  if (load_flag(&r.fail_flag) != 1u) return ok();
  const uint32_t kind = op[0] == 'c' ? uint32_t(core::OpKind::Combine) : uint32_t(core::OpKind::Dispatch);
  const char* const* names = kind == uint32_t(core::OpKind::Combine) ? core::kCombineDescNames : core::kDispatchDescNames;
  switch (KernelFailure(r.fail_kind)) {
    case KernelFailure::Timeout:
      return timeout_report_error(r, rank, epoch);
    case KernelFailure::PeerAborted:
      return abandoned_error(rank, uint32_t(r.expected), r.peer, r.a, core::WaitRole(r.b), sy_status(r.c));
    case KernelFailure::PeerRejected:
      return peer_rejected_error(rank, epoch, kind, r.peer);
    case KernelFailure::KindMismatch:
      return kind_mismatch_error(rank, epoch, uint32_t(r.expected), r.peer, uint32_t(r.observed));
    case KernelFailure::DescMismatch: {
      const int word = r.a > 0 && r.a < core::kDescWords ? r.a : 0;
      return desc_mismatch_error(rank, epoch, kind, r.peer, names[word], uint32_t(r.expected), uint32_t(r.observed));
    }
    case KernelFailure::PeerMovedOn:
      return peer_moved_on_error(rank, uint32_t(r.expected), r.peer, uint32_t(r.observed));
    case KernelFailure::CachedMismatch:
      return cached_mismatch_error(rank, r.expected, r.observed);
    case KernelFailure::Capacity:
      return capacity_error(rank, r.observed, r.expected, r.a == 1);
    case KernelFailure::DispatchFailed:
      return failed_handle_error();
    case KernelFailure::HandleMismatch:
      return invalid("handle", "handle: rank " + std::to_string(r.peer) + " holds " + std::to_string(r.expected) +
                                   " rows where rank " + std::to_string(rank) + "'s handle expects row " +
                                   std::to_string(r.observed) + "; every rank must pass the handle of the same dispatch");
    case KernelFailure::Internal:
      if (r.a == -3) {
        return fail(SY_ERROR_INTERNAL, "rank " + std::to_string(rank) + ": " + op +
                                           ": an earlier two-hop dispatch failed in its network hop, which left the "
                                           "network rings' counters out of step with the peers'; create the buffers "
                                           "again");
      }
      if (nic_failed_put(r.a, r.b, r.c)) {
        // Not a bug of ours: the NIC could not carry a put to that rank (ibverbs: the rank is gone,
        // so its queue pair no longer answers, or the NIC failed; the proxy's error says which).
        Error e = r.peer < 0 ? fail(SY_ERROR_PEER_FAILED, "rank " + std::to_string(rank) + ": " + op +
                                                              ": its proxy's NIC engine failed, on none of its puts")
                             : fail(SY_ERROR_PEER_FAILED,
                                    "rank " + std::to_string(rank) + ": " + op + ": the network failed on the way to rank " +
                                        std::to_string(r.peer) + " (its proxy's NIC engine failed at channel " +
                                        std::to_string(r.observed) + ", descriptor " + std::to_string(r.expected) +
                                        "): rank " + std::to_string(r.peer) + " may have gone, or the NIC failed");
        if (const std::string said = nic_said ? nic_said() : std::string(); !said.empty()) e.message += ": " + said;
        e.wait.rank = rank;
        e.wait.peer = r.peer;
        return e;
      }
      if (r.a == -4) {
        const bool refused = transport::TransportResult(r.b) == transport::TransportResult::Refused;
        const std::string to = r.peer >= 0 ? "rank " + std::to_string(r.peer) : std::string("no rank of the group");
        return fail(SY_ERROR_INTERNAL,
                    "rank " + std::to_string(rank) + ": " + op + ": its proxy " +
                        (refused ? "refused a put to " + to + " (" + transport::refusal_text(transport::Refusal(r.c)) +
                                       ", channel " + std::to_string(r.observed) + ", descriptor " +
                                       std::to_string(r.expected) + ")"
                                 : "took no descriptor of channel " + std::to_string(r.observed) +
                                       " within the deadline (a put to rank " + std::to_string(r.peer) + ")"));
      }
      if (r.a == -5 || r.a == -6) {
        return fail(SY_ERROR_INTERNAL, "rank " + std::to_string(rank) + ": " + op + ": rank " + std::to_string(r.peer) +
                                           (r.a == -5 ? " sent a network record for slot " : " announced ") +
                                           std::to_string(r.observed) +
                                           (r.a == -5 ? "" : " network records") + ", past the " +
                                           std::to_string(r.expected) + " tokens a buffer holds per rank");
      }
      if (r.a == -7) {
        return fail(SY_ERROR_INTERNAL, "rank " + std::to_string(rank) + ": " + op + ": forwarder " +
                                           std::to_string(r.peer) + " delivered " + std::to_string(r.observed) +
                                           " records here, the source announced " + std::to_string(r.expected));
      }
      if (r.a == -8) {
        return fail(SY_ERROR_INTERNAL, "rank " + std::to_string(rank) + ": " + op + ": rank " + std::to_string(r.peer) +
                                           " (node " + std::to_string(r.expected) + ") put a network entry of kind " +
                                           std::to_string(r.b) + " for token " + std::to_string(r.observed) +
                                           " of node " + std::to_string(r.c) +
                                           ", which this rank does not expect from it now");
      }
      if (r.a == -9) {
        return fail(SY_ERROR_INTERNAL, "rank " + std::to_string(rank) + ": " + op + ": rank " + std::to_string(r.peer) +
                                           " sent a network record for token " + std::to_string(r.observed) +
                                           " (after token " + std::to_string(r.expected) +
                                           ") on its way from node " + std::to_string(r.b) + " to node " +
                                           std::to_string(r.c) +
                                           "; records come in token order, from a node before this one to one after");
      }
      if (r.a == -10) {
        return fail(SY_ERROR_INTERNAL, "rank " + std::to_string(rank) + ": " + op + ": rank " + std::to_string(r.peer) +
                                           " announced " + std::to_string(r.observed) + " network entries in lane " +
                                           std::to_string(r.b) + " for this rank, which expects " +
                                           std::to_string(r.expected) +
                                           " (the ranks disagree about the routing: every rank must pass the handle "
                                           "of the same dispatch)");
      }
      if (r.a < 0) {
        return fail(SY_ERROR_INTERNAL, "rank " + std::to_string(rank) + ": rank " + std::to_string(r.peer) +
                                           " listed token " + std::to_string(r.observed) + " of its " +
                                           std::to_string(r.expected) + " (the ranks disagree about the routing)");
      }
      return fail(SY_ERROR_INTERNAL, "rank " + std::to_string(rank) + ": " + std::to_string(r.observed) +
                                         " rows arrived for local expert " + std::to_string(r.a) + " but the peers counted " +
                                         std::to_string(r.expected));
    default:
      return fail(SY_ERROR_INTERNAL, std::string(op) + ": a kernel failed with an unknown record (" +
                                         std::to_string(r.fail_kind) + ")");
  }
}

}  // namespace sy::cuda
