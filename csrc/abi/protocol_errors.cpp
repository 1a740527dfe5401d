#include "protocol_errors.h"

#include "../core/op_desc.h"
#include "../core/plan.h"

namespace sy {

Error abandoned_error(int rank, uint32_t epoch, int failed, int peer, core::WaitRole role, sy_status status) {
  std::string msg = "rank " + std::to_string(rank) + ": operation " + std::to_string(epoch) +
                    " of this buffer was abandoned by rank " + std::to_string(failed);
  if (status == SY_ERROR_TIMEOUT && peer >= 0) {
    msg += ", which timed out waiting for rank " + std::to_string(peer) + " in " + core::wait_role_name(role);
  } else if (status == SY_ERROR_PEER_FAILED && peer >= 0) {
    // The peer itself, or the network on the way to it (a NIC's failed put): the same to this rank.
    msg += " after rank " + std::to_string(peer) + " failed or could not be reached (" + core::wait_role_name(role) + ")";
  } else if (status == SY_ERROR_INVALID_ARGUMENT) {
    msg += " because its input was invalid (see rank " + std::to_string(failed) + "'s error)";
  } else {
    msg += std::string(" (") + sy_status_name(status) + ")";
  }
  msg += "; this buffer set cannot be used again, create new buffers";
  Error e = fail(SY_ERROR_PEER_FAILED, msg);
  e.wait.rank = rank;
  e.wait.peer = peer >= 0 ? peer : failed;
  e.wait.role = role;
  e.wait.expected = epoch;
  return e;
}

Error kind_mismatch_error(int rank, uint32_t epoch, uint32_t mine, int peer, uint32_t theirs) {
  Error e = fail(SY_ERROR_INVALID_ARGUMENT,
                 "rank " + std::to_string(rank) + " called " + core::op_kind_name(mine) + " as operation " +
                     std::to_string(epoch) + " of this buffer, but rank " + std::to_string(peer) + " called " +
                     core::op_kind_name(theirs) + "; every rank must call the same operations in the same order",
                 "operation");
  e.peers_informed = true;
  return e;
}

Error peer_moved_on_error(int rank, uint32_t epoch, int peer, uint32_t theirs) {
  Error e = fail(SY_ERROR_PEER_FAILED,
                 "rank " + std::to_string(rank) + ": rank " + std::to_string(peer) + " had moved on to operation " +
                     std::to_string(theirs) + " of this buffer before this rank could compare operation " +
                     std::to_string(epoch) + " with it (it gave up waiting for an operation in between); this "
                     "buffer set cannot be used again, create new buffers",
                 "operation");
  e.wait.rank = rank;
  e.wait.peer = peer;
  e.wait.expected = epoch;
  e.wait.observed = theirs;
  return e;
}

Error peer_rejected_error(int rank, uint32_t epoch, uint32_t kind, int peer) {
  Error e = fail(SY_ERROR_PEER_FAILED,
                 "rank " + std::to_string(rank) + ": rank " + std::to_string(peer) + " rejected its input for " +
                     core::op_kind_name(kind) + " (operation " + std::to_string(epoch) + "; see rank " +
                     std::to_string(peer) + "'s error), so no rank ran it",
                 "operation");
  e.wait.rank = rank;
  e.wait.peer = peer;
  e.peers_informed = true;
  return e;
}

Error desc_mismatch_error(int rank, uint32_t epoch, uint32_t kind, int peer, const char* name, uint32_t mine,
                          uint32_t theirs) {
  Error e = fail(SY_ERROR_INVALID_ARGUMENT,
                 "rank " + std::to_string(rank) + " and rank " + std::to_string(peer) + " called " +
                     core::op_kind_name(kind) + " (operation " + std::to_string(epoch) + ") with different " +
                     (name ? name : "parameters") + " (" + std::to_string(mine) + " vs " + std::to_string(theirs) +
                     "); every rank must pass matching arguments",
                 "operation");
  e.peers_informed = true;
  return e;
}

Error cached_mismatch_error(int rank, int64_t expected, int64_t sent) {
  return invalid("handle", "handle: the cached routing expects " + std::to_string(expected) + " rows at rank " +
                               std::to_string(rank) + " but the peers sent " + std::to_string(sent) +
                               "; every rank must pass the handle of the same dispatch");
}

Error capacity_error(int rank, int64_t needed, int64_t capacity, bool expanded_rows) {
  if (expanded_rows) {
    return invalid("numWorstTokens", "numWorstTokens: rank " + std::to_string(rank) + " needs " +
                                         std::to_string(needed) + " expanded rows but the outputs hold " +
                                         std::to_string(capacity));
  }
  return invalid("numWorstTokens", "numWorstTokens: rank " + std::to_string(rank) + " received " +
                                       std::to_string(needed) + " tokens but the outputs hold " +
                                       std::to_string(capacity) + " rows");
}

Error failed_handle_error(Error dispatch_failure) {
  if (!dispatch_failure) {
    return invalid("handle", "handle: its dispatch did not complete (it failed), so there is nothing to combine");
  }
  // The dispatch's own failure, with its code and the rank it names (a refused argument of the
  // dispatch is this call's handle).
  dispatch_failure.message = "handle: its dispatch failed, so there is nothing to combine: " + dispatch_failure.message;
  if (!dispatch_failure.argument.empty()) dispatch_failure.argument = "handle";
  dispatch_failure.peers_informed = false;  // this combine's peers are told as for any refusal
  return dispatch_failure;
}

Error topk_problem_error(core::TopkProblem kind, int64_t token, int entry, int64_t value, int64_t experts) {
  if (kind == core::TopkProblem::Duplicate) {
    return invalid("topkIdx", "topkIdx: token " + std::to_string(token) + " lists expert " + std::to_string(value) +
                                  " more than once (entry " + std::to_string(entry) + ")");
  }
  return invalid("topkIdx", "topkIdx: token " + std::to_string(token) + ", entry " + std::to_string(entry) +
                                " holds expert " + std::to_string(value) + ", outside [0, " + std::to_string(experts) +
                                ") (-1 marks an unused entry)");
}

Error ll_peer_rejected_error(int rank, int peer, const char* op, uint32_t call) {
  Error e = fail(SY_ERROR_PEER_FAILED, "rank " + std::to_string(rank) + ": rank " + std::to_string(peer) +
                                           " rejected its input for low-latency " + op + " (call " +
                                           std::to_string(call) + "; see rank " + std::to_string(peer) +
                                           "'s error), so the call failed everywhere",
                 "operation");
  e.wait.rank = rank;
  e.wait.peer = peer;
  e.peers_informed = true;
  return e;
}

Error ll_format_error(int rank, int peer, const char* op, uint32_t theirs, uint32_t mine) {
  const bool combine = std::string(op) == "combine";
  auto name = [&](uint32_t f) -> std::string {
    if (combine) return (f & core::kFormatLogfmt) ? "LogFMT-10" : "BF16";
    return (f & core::kFormatFp8) ? ((f & core::kFormatUe8m0) ? "FP8 with UE8M0 scales" : "FP8 with f32 scales") : "BF16";
  };
  const bool ue8m0_only = ((theirs ^ mine) & ~core::kFormatUe8m0) == 0;
  const char* arg = combine ? "useLogfmt" : (ue8m0_only ? "useUe8m0" : "useFp8");
  Error e = invalid(arg, std::string(arg) + ": rank " + std::to_string(peer) + " sent " + name(theirs) + " but rank " +
                             std::to_string(rank) + " expects " + name(mine) + "; every rank must pass the same options");
  e.peers_informed = true;
  return e;
}

Error ll_overwritten_error(int rank, int peer, const char* what, uint32_t call, uint32_t theirs) {
  Error e = fail(SY_ERROR_INTERNAL, std::string(what) + " of low-latency call " + std::to_string(call) + " at rank " +
                                        std::to_string(rank) + " was overwritten by rank " + std::to_string(peer) +
                                        "'s call " + std::to_string(theirs) + " while it was read");
  e.peers_informed = true;
  return e;
}

Error ll_count_error(int peer, int64_t count) {
  return fail(SY_ERROR_INTERNAL, "rank " + std::to_string(peer) + " announced " + std::to_string(count) +
                                     " tokens for one expert, more than maxTokensPerRank");
}

Error ll_failed_dispatch_error(uint32_t dispatch_call, Error dispatch_failure) {
  if (!dispatch_failure) {
    return invalid("handle", "handle: the receive phase of low-latency call " + std::to_string(dispatch_call) +
                                 " has not run; run its hook before combining");
  }
  dispatch_failure.message = "handle: its low-latency dispatch (call " + std::to_string(dispatch_call) +
                             ") failed: " + dispatch_failure.message;
  dispatch_failure.peers_informed = true;
  return dispatch_failure;
}

Error ll_routing_mismatch_error(uint32_t dispatch_call) {
  Error e = invalid("topkIdx", "topkIdx: differs from the routing low-latency call " + std::to_string(dispatch_call) +
                                   " dispatched with; pass the same topkIdx to combine");
  e.peers_informed = true;
  return e;
}

Error missing_ranks_error(const core::WaitFailure& w, uint32_t epoch, const std::string& missing) {
  return timeout_error(w, "operation " + std::to_string(epoch) + " of this buffer; missing: rank" +
                              (missing.find(',') != std::string::npos ? "s " : " ") + missing);
}

Error untold_refusal_error(Error why, const Error& untold) {
  why.message += "; the peers could not be told (" + untold.message + "), so they fail this call at their deadline";
  return why;
}

}  // namespace sy
